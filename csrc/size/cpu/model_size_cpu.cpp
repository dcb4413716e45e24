// CPU kernel of bnao::model_size: closed-form parameters and multiply-adds of
// the stand-alone network of every arch of an [n, 8B] int64 array.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <atomic>
#include <vector>

#include "size/model_size.h"

namespace bnao {
namespace {

at::Tensor model_size_cpu(const at::Tensor& archs, int64_t num_nodes, at::IntArrayRef op_kinds,
                          at::IntArrayRef op_kernels, int64_t skeleton, int64_t layers, int64_t channels,
                          int64_t num_classes, int64_t in_channels, int64_t image_size) {
  TORCH_CHECK(archs.device().is_cpu(), "model_size: archs must be a CPU tensor, got ", archs.device());
  TORCH_CHECK(archs.scalar_type() == at::kLong, "model_size: archs must be int64, got ", archs.scalar_type());
  TORCH_CHECK(num_nodes >= 1 && num_nodes <= size::kMaxNodes, "model_size: num_nodes must be in [1, ",
              size::kMaxNodes, "], got ", num_nodes);
  TORCH_CHECK(archs.dim() == 2 && archs.size(1) == 8 * num_nodes, "model_size: archs must have shape [n, ",
              8 * num_nodes, "] (8*num_nodes integers per arch), got ", archs.sizes());
  TORCH_CHECK(!op_kinds.empty(), "model_size: the op set is empty");
  TORCH_CHECK(op_kinds.size() == op_kernels.size(), "model_size: op_kinds and op_kernels differ in length (",
              op_kinds.size(), " vs ", op_kernels.size(), ")");
  for (size_t o = 0; o < op_kinds.size(); ++o) {
    TORCH_CHECK(op_kinds[o] >= size::kZero && op_kinds[o] <= size::kMaxPool, "model_size: op ", o,
                " has unknown kind ", op_kinds[o]);
    const bool conv = op_kinds[o] == size::kSepConv || op_kinds[o] == size::kDilSepConv;
    TORCH_CHECK(!conv || (op_kernels[o] >= 1 && op_kernels[o] % 2 == 1), "model_size: op ", o,
                " has an invalid kernel size ", op_kernels[o], " (odd, >= 1)");
  }
  TORCH_CHECK(skeleton == size::kCifar || skeleton == size::kImageNet,
              "model_size: skeleton must be 0 (cifar) or 1 (imagenet), got ", skeleton);
  TORCH_CHECK(layers >= 1, "model_size: layers must be >= 1, got ", layers);
  TORCH_CHECK(channels >= 1, "model_size: channels must be >= 1, got ", channels);
  TORCH_CHECK(skeleton != size::kImageNet || channels >= 2,
              "model_size: the imagenet skeleton needs channels >= 2, got ", channels);
  TORCH_CHECK(num_classes >= 1, "model_size: num_classes must be >= 1, got ", num_classes);
  TORCH_CHECK(in_channels >= 1, "model_size: in_channels must be >= 1, got ", in_channels);
  TORCH_CHECK(image_size >= 1, "model_size: image_size must be >= 1, got ", image_size);
  // Guard the sizes that enter products before tabulating them.
  TORCH_CHECK(layers <= (1 << 20) && channels <= (1 << 24) && num_classes <= (int64_t{1} << 32) &&
                  in_channels <= (1 << 24) && image_size <= (1 << 20),
              "model_size: layers/channels/num_classes/in_channels/image_size are out of the supported range");

  size::NetConfig cfg;
  cfg.num_nodes = num_nodes;
  cfg.skeleton = skeleton;
  cfg.layers = layers;
  cfg.channels = channels;
  cfg.num_classes = num_classes;
  cfg.in_channels = in_channels;
  cfg.image_size = image_size;
  const size::ModelSizeCounter counter(cfg, std::vector<int64_t>(op_kinds.begin(), op_kinds.end()),
                                       std::vector<int64_t>(op_kernels.begin(), op_kernels.end()));
  TORCH_CHECK(counter.max_count_bound() < 9.0e18,
              "model_size: counts of this configuration could overflow int64; use smaller sizes");

  const at::Tensor in = archs.contiguous();
  const int64_t n = in.size(0), len = in.size(1);
  at::Tensor out = at::empty({n, 2}, in.options().dtype(at::kLong));
  const int64_t* src = in.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();

  // First invalid row (n when none) and its position; the smallest row wins so
  // the error is the same at any thread count.
  std::atomic<int64_t> bad_row{n};
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t pos = counter.count(src + i * len, dst + 2 * i, dst + 2 * i + 1);
      if (pos >= 0) {
        int64_t cur = bad_row.load();
        while (i < cur && !bad_row.compare_exchange_weak(cur, i)) {
        }
        break;  // later rows of this chunk cannot be smaller
      }
    }
  });
  if (bad_row.load() < n) {
    const int64_t row = bad_row.load();
    const int64_t pos = counter.count(src + row * len, dst + 2 * row, dst + 2 * row + 1);
    TORCH_CHECK(false, "model_size: arch ", row, ": ", size::describe_position(pos, num_nodes), ": value ",
                src[row * len + pos], " is out of range (ids must name an earlier state, ops be < ",
                op_kinds.size(), ")");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnao, CPU, m) { m.impl("model_size", &model_size_cpu); }

}  // namespace bnao

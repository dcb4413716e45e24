// Unit test of csrc/size/model_size.h against counts derived by hand.
// Returns non-zero when a check fails. No framework: built by CMake/ctest.
//
// Hand derivation (CIFAR skeleton, B=5, N=1, C=4, 10 classes, 3 input
// channels, 8x8 images). Cells: 0 normal C=4, 1 reduction C=8, 2 normal C=8,
// 3 reduction C=16, 4 normal C=16. An arch whose every node is
// [0, op, 0, op] leaves states 1..6 loose (L=6) in both cells; a reduction
// cell then factorized-reduces its loose input 1 (C -> C).
//   stem conv 3->12 k3 + BN          params 324+24=348      madds 8*8*12*3*9 = 20736
//   cell0 1x1 12->4 twice (+BN)      params 2*(48+8)=112    madds 2*64*48    = 6144
//   cell1 1x1 12->8, 24->8 (+BN)     params 112+208=320     madds 64*(96+192)= 18432
//         loose FR 8->8 at 4x4       params 64+16=80        madds 16*64      = 1024
//   cell2 FR 24->8 at 4x4, 1x1 48->8 params 208+400=608     madds 16*192+16*384 = 9216
//   cell3 1x1 48->16 twice           params 2*800=1600      madds 2*16*768   = 24576
//         loose FR 16->16 at 2x2     params 256+32=288      madds 4*256      = 1024
//   cell4 FR 48->16, 1x1 96->16      params 800+1568=2368   madds 4*768+4*1536 = 9216
//   classifier 96 -> 10              params 970             madds 960
//   total                            params 6694            madds 91328
// With avg pools (op 2) the branches cost nothing. With identities (op 4),
// each reduction cell has 10 stride-2 identities = factorized reduces C -> C:
//   cell1: 10*(64+16) = 800 params, 10*16*64 = 10240 madds;
//   cell3: 10*(256+32) = 2880 params, 10*4*256 = 10240 madds
//   total params 6694 + 3680 = 10374, madds 91328 + 20480 = 111808.
// With sep_conv_3x3 (op 0) on every branch of the all-[0, op, 0, op] arch:
//   each branch at C: params 2*(9C + C^2 + 2C), madds hw*2*(9C + C^2);
//   normal cells: cell0 C=4 hw=64: 10*2*(36+16+8)=1200 params, 64*10*2*52=66560 madds
//                 cell2 C=8 hw=16: 10*2*(72+64+16)=3040, 16*10*2*136=43520
//                 cell4 C=16 hw=4: 10*2*(144+256+32)=8640, 4*10*2*400=32000
//   reduction cells (stride-2 sep convs, output hw): cell1 C=8 hw=16: 3040, 43520;
//                 cell3 C=16 hw=4: 8640, 32000
//   total params 6694 + 24560 = 31254, madds 91328 + 217600 = 308928.
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "size/model_size.h"

using bnao::size::ModelSizeCounter;
using bnao::size::NetConfig;

namespace {

int failures = 0;

void expect_eq(int64_t got, int64_t want, const char* what) {
  if (got != want) {
    std::printf("FAIL %s: got %lld, want %lld\n", what, static_cast<long long>(got), static_cast<long long>(want));
    ++failures;
  } else {
    std::printf("ok   %s = %lld\n", what, static_cast<long long>(got));
  }
}

// The "small" op set: sep_conv 3x3, sep_conv 5x5, avg_pool, max_pool, identity.
const std::vector<int64_t> kSmallKinds = {bnao::size::kSepConv, bnao::size::kSepConv, bnao::size::kAvgPool,
                                          bnao::size::kMaxPool, bnao::size::kIdentity};
const std::vector<int64_t> kSmallKernels = {3, 5, 3, 3, 0};

std::vector<int64_t> all_from_input0(int64_t op, int64_t num_nodes) {
  std::vector<int64_t> arch;
  for (int c = 0; c < 2; ++c)
    for (int64_t i = 0; i < num_nodes; ++i) arch.insert(arch.end(), {0, op, 0, op});
  return arch;
}

NetConfig tiny_cifar() {
  NetConfig cfg;
  cfg.num_nodes = 5;
  cfg.skeleton = bnao::size::kCifar;
  cfg.layers = 1;
  cfg.channels = 4;
  cfg.num_classes = 10;
  cfg.in_channels = 3;
  cfg.image_size = 8;
  return cfg;
}

}  // namespace

int main() {
  const ModelSizeCounter counter(tiny_cifar(), kSmallKinds, kSmallKernels);
  // Outputs are reset to a sentinel before every call, so a count that does not
  // run (or returns early) cannot pass on the values of the previous arch.
  constexpr int64_t kUnset = -7;
  int64_t params = kUnset, madds = kUnset;

  struct Valid {
    int64_t op;
    int64_t params, madds;
    const char* name;
  };
  const Valid valid[] = {{2, 6694, 91328, "avg-pool"},
                         {3, 6694, 91328, "max-pool"},
                         {4, 10374, 111808, "identity"},
                         {0, 31254, 308928, "sep_conv_3x3"}};
  for (const Valid& v : valid) {
    const auto arch = all_from_input0(v.op, 5);
    params = madds = kUnset;
    const std::string name(v.name);
    expect_eq(counter.count(arch.data(), &params, &madds), -1, (name + " arch is valid").c_str());
    expect_eq(params, v.params, (name + " arch params").c_str());
    expect_eq(madds, v.madds, (name + " arch madds").c_str());
  }

  // Invalid values: the position of the first bad integer is reported and nothing is written.
  const auto pools = all_from_input0(2, 5);
  struct Invalid {
    int64_t position, value, want;
    const char* name;
  };
  const Invalid invalid[] = {
      {4, 3, 4, "input id 3 at node 3 (ids 0..2) is rejected at position 4"},
      {20 + 3, 5, 23, "reduction cell, node 2, y_op 5 (the small set has ops 0..4) is rejected at position 23"},
      {1, -1, 1, "negative op is rejected at position 1"},
      {20 + 4 * 4 + 2, 6, 38, "reduction cell, node 6, y_id 6 (ids 0..5) is rejected at position 38"},
      {20, -1, 20, "negative input id at the first reduction position is rejected at position 20"},
  };
  for (const Invalid& b : invalid) {
    auto bad = pools;
    bad[b.position] = b.value;
    params = madds = kUnset;
    expect_eq(counter.count(bad.data(), &params, &madds), b.want, b.name);
    expect_eq(params, kUnset, (std::string(b.name) + ": params not written").c_str());
    expect_eq(madds, kUnset, (std::string(b.name) + ": madds not written").c_str());
  }

  const std::string where = bnao::size::describe_position(23, 5);
  if (where != "reduction cell, node 2 (position 23), y_op") {
    std::printf("FAIL describe_position: %s\n", where.c_str());
    ++failures;
  }

  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all model_size checks passed\n");
  return 0;
}

// Closed-form model size (parameters and multiply-adds) of the stand-alone
// network of a NAO arch (SPEC section 3). Dependency-free: the torch kernel
// (cpu/model_size_cpu.cpp) and the C++ unit test include it alone.
//
// The network is the one bnao/nets builds (NAO reference structure); the
// pure-Python twin is bnao/size/reference.py. Change the three together.
//
// Counting conventions:
//   * parameters: every conv weight (no conv has a bias), BN weight + bias
//     (2 per channel), classifier weight + bias; the auxiliary head is excluded.
//   * multiply-adds per image: each conv contributes
//     out_h * out_w * out_c * (in_c / groups) * k_h * k_w, the classifier
//     in * out; pools, BN, ReLU, additions, concatenations count 0.
//
// How it is fast: for a fixed skeleton (N, C, image size), everything a cell
// costs except its branch ops depends on the arch only through the number of
// loose ends L of the normal and of the reduction cell (it fixes the channels
// of the next cells' inputs). That part is tabulated once per skeleton for
// every (L_normal, L_reduction) by walking the network literally. Branch ops
// of a cell with C channels at output resolution hw cost params a*C^2 + bp*C
// and madds hw*(a*C^2 + bm*C) with integer coefficients summed over the cell's
// branches, so an arch costs two passes over its 8B integers plus a handful of
// multiply-adds against per-skeleton sums of C^2, C, hw*C^2, hw*C.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/op_kinds.h"

namespace bnao {
namespace size {

// Op kind codes (csrc/common/op_kinds.h), shared with the fused cell kernels.
using bnao::OpKind;
using bnao::kZero;
using bnao::kIdentity;
using bnao::kSepConv;
using bnao::kDilSepConv;
using bnao::kAvgPool;
using bnao::kMaxPool;

// Skeleton codes; must equal bnao/size/__init__.py (SKELETON_CODES).
enum Skeleton : int64_t { kCifar = 0, kImageNet = 1 };

constexpr int64_t kMaxNodes = 60;  // the used-state mask is one 64-bit word

struct NetConfig {
  int64_t num_nodes = 5;
  int64_t skeleton = kCifar;
  int64_t layers = 3;       // N normal cells between reductions
  int64_t channels = 20;    // C of the first cells
  int64_t num_classes = 10;
  int64_t in_channels = 3;
  int64_t image_size = 32;  // square input, for multiply-adds
};

// Branch-op cost at C channels: params a*C^2 + bp*C, madds hw_out*(a*C^2 + bm*C).
struct Poly {
  int64_t a = 0;
  int64_t bp = 0;
  int64_t bm = 0;
};

inline Poly branch_cost(int64_t kind, int64_t kernel, bool stride2) {
  Poly p;
  const int64_t kk = kernel * kernel;
  switch (kind) {
    case kSepConv:  // (depthwise kxk + pointwise 1x1 + BN) twice
      p.a = 2;
      p.bp = 2 * kk + 4;
      p.bm = 2 * kk;
      break;
    case kDilSepConv:  // depthwise kxk (dilated) + pointwise 1x1 + BN, once
      p.a = 1;
      p.bp = kk + 2;
      p.bm = kk;
      break;
    case kIdentity:  // stride 2: factorized reduce C -> C (two 1x1 convs to C/2 and C - C/2, BN)
      if (stride2) {
        p.a = 1;
        p.bp = 2;
      }
      break;
    default:  // zero, pools: no weights, no multiply-adds
      break;
  }
  return p;
}

inline int64_t ceil_half(int64_t h) { return (h + 1) / 2; }

// Counts the network of any arch of one skeleton and op set.
class ModelSizeCounter {
 public:
  // op_kinds / op_kernels: (kind, kernel) per op index of the op set.
  ModelSizeCounter(const NetConfig& cfg, const std::vector<int64_t>& op_kinds,
                   const std::vector<int64_t>& op_kernels)
      : cfg_(cfg), num_ops_(static_cast<int64_t>(op_kinds.size())) {
    const int64_t B = cfg.num_nodes;
    cell_len_ = 4 * B;
    for (int s = 0; s < 2; ++s) {
      costs_[s].resize(num_ops_);
      for (int64_t o = 0; o < num_ops_; ++o) costs_[s][o] = branch_cost(op_kinds[o], op_kernels[o], s == 1);
    }
    max_loose_ = B + 2;
    fixed_.assign(static_cast<size_t>((max_loose_ + 1) * (max_loose_ + 1)), Fixed{});
    for (int64_t ln = 1; ln <= max_loose_; ++ln)
      for (int64_t lr = 1; lr <= max_loose_; ++lr) fixed_[index(ln, lr)] = walk(ln, lr);
  }

  const NetConfig& config() const { return cfg_; }

  // Counts one arch (8B integers, normal cell first). Returns -1 on success,
  // else the position of the first value out of range (nothing written).
  int64_t count(const int64_t* arch, int64_t* params, int64_t* madds) const {
    Poly pn, pr;
    int64_t ln, lr;
    int64_t bad = summarize(arch, false, &pn, &ln);
    if (bad >= 0) return bad;
    bad = summarize(arch + cell_len_, true, &pr, &lr);
    if (bad >= 0) return bad + cell_len_;
    const Fixed& f = fixed_[index(ln, lr)];
    *params = f.params + pn.a * sum_.n_c2 + pn.bp * sum_.n_c + pr.a * sum_.r_c2 + pr.bp * sum_.r_c;
    *madds = f.madds + pn.a * sum_.n_hc2 + pn.bm * sum_.n_hc + pr.a * sum_.r_hc2 + pr.bm * sum_.r_hc;
    return -1;
  }

  // Upper bound of any count for this skeleton, in double precision (to refuse
  // configurations whose counts could overflow int64).
  double max_count_bound() const {
    double worst_a = 0, worst_b = 0;
    for (int s = 0; s < 2; ++s)
      for (const Poly& p : costs_[s]) {
        worst_a = worst_a > p.a ? worst_a : static_cast<double>(p.a);
        double b = static_cast<double>(p.bp > p.bm ? p.bp : p.bm);
        worst_b = worst_b > b ? worst_b : b;
      }
    // 2B branches plus up to 2 loose-input factorized reduces (a=1, bp=2) per cell.
    const double n_br = 2.0 * static_cast<double>(cfg_.num_nodes);
    const double A = n_br * worst_a + 2.0, Bc = n_br * worst_b + 4.0;
    double fixed_max = 0;
    for (const Fixed& f : fixed_) {
      double m = static_cast<double>(f.params_d > f.madds_d ? f.params_d : f.madds_d);
      fixed_max = fixed_max > m ? fixed_max : m;
    }
    double sums = A * (sum_d_.n_hc2 + sum_d_.r_hc2 + sum_d_.n_c2 + sum_d_.r_c2) +
                  Bc * (sum_d_.n_hc + sum_d_.r_hc + sum_d_.n_c + sum_d_.r_c);
    return fixed_max + sums;
  }

 private:
  struct Fixed {
    int64_t params = 0, madds = 0;
    double params_d = 0, madds_d = 0;  // same in double, for the overflow bound
  };
  struct Sums {  // over normal (n_) / reduction (r_) cells: C^2, C, hw*C^2, hw*C
    int64_t n_c2 = 0, n_c = 0, n_hc2 = 0, n_hc = 0, r_c2 = 0, r_c = 0, r_hc2 = 0, r_hc = 0;
  };
  struct SumsD {
    double n_c2 = 0, n_c = 0, n_hc2 = 0, n_hc = 0, r_c2 = 0, r_c = 0, r_hc2 = 0, r_hc = 0;
  };

  size_t index(int64_t ln, int64_t lr) const { return static_cast<size_t>(ln * (max_loose_ + 1) + lr); }

  // Branch-op coefficients and loose-end count of one cell; -1 or the bad position.
  int64_t summarize(const int64_t* cell, bool reduction, Poly* out, int64_t* loose) const {
    const std::vector<Poly>& c1 = costs_[0];
    const std::vector<Poly>& c2 = costs_[reduction ? 1 : 0];
    uint64_t used = 0;
    Poly p;
    const int64_t B = cfg_.num_nodes;
    for (int64_t i = 0; i < B; ++i) {
      const int64_t* n = cell + 4 * i;
      const int64_t node_id = i + 2;
      // Unsigned compares reject negatives too.
      if (static_cast<uint64_t>(n[0]) >= static_cast<uint64_t>(node_id)) return 4 * i;
      if (static_cast<uint64_t>(n[1]) >= static_cast<uint64_t>(num_ops_)) return 4 * i + 1;
      if (static_cast<uint64_t>(n[2]) >= static_cast<uint64_t>(node_id)) return 4 * i + 2;
      if (static_cast<uint64_t>(n[3]) >= static_cast<uint64_t>(num_ops_)) return 4 * i + 3;
      used |= (uint64_t{1} << n[0]) | (uint64_t{1} << n[2]);
      // In a reduction cell only branches reading a cell input (id 0 or 1) have stride 2.
      const Poly& x = (n[0] < 2 ? c2 : c1)[n[1]];
      const Poly& y = (n[2] < 2 ? c2 : c1)[n[3]];
      p.a += x.a + y.a;
      p.bp += x.bp + y.bp;
      p.bm += x.bm + y.bm;
    }
    *loose = B + 2 - __builtin_popcountll(used);
    if (reduction) {
      // Loose inputs of a reduction cell are factorized-reduced C -> C before the concat.
      const int64_t li = 2 - __builtin_popcountll(used & 3u);
      p.a += li;
      p.bp += 2 * li;
    }
    *out = p;
    return -1;
  }

  // Everything but the branch ops (and loose-input reduces) for given loose-end
  // counts, by walking the skeleton; also fills the per-skeleton sums.
  Fixed walk(int64_t ln, int64_t lr) {
    Fixed f;
    Sums s;
    SumsD sd;
    auto add = [&f](int64_t p, int64_t m) {
      f.params += p;
      f.madds += m;
      f.params_d += static_cast<double>(p);
      f.madds_d += static_cast<double>(m);
    };
    // conv (no bias) + BN, output hw x hw
    auto conv_bn = [&add](int64_t cin, int64_t cout, int64_t k, int64_t hw) {
      add(cout * cin * k * k + 2 * cout, hw * hw * cout * cin * k * k);
    };
    const int64_t C = cfg_.channels, in = cfg_.in_channels;
    // (resolution, channels, level) of the two cell inputs
    int64_t h0, c0, l0, h1, c1, l1;
    int64_t h = cfg_.image_size;
    if (cfg_.skeleton == kCifar) {
      conv_bn(in, 3 * C, 3, h);
      h0 = h1 = h;
      c0 = c1 = 3 * C;
      l0 = l1 = 0;
    } else {
      const int64_t half = C / 2;
      const int64_t ha = ceil_half(h), hb = ceil_half(ha), hc = ceil_half(hb);
      conv_bn(in, half, 3, ha);
      conv_bn(half, C, 3, hb);
      conv_bn(C, C, 3, hc);
      h0 = hb, c0 = C, l0 = 2;
      h1 = hc, c1 = C, l1 = 3;
    }
    int64_t c = C;
    const int64_t N = cfg_.layers, cells = 3 * N + 2;
    for (int64_t i = 0; i < cells; ++i) {
      const bool red = (i == N || i == 2 * N + 1);
      if (red) c *= 2;
      // Input calibration (NAO MaybeCalibrateSize).
      if (l0 != l1) {
        add(c0 * c + 2 * c, h1 * h1 * c0 * c);  // factorized reduce c0 -> c: two 1x1 convs, BN
      } else if (c0 != c) {
        conv_bn(c0, c, 1, h0);
      }
      if (c1 != c) conv_bn(c1, c, 1, h1);
      const int64_t hout = red ? ceil_half(h1) : h1;
      const int64_t hw = hout * hout;
      const int64_t loose = red ? lr : ln;
      if (red) {
        s.r_c2 += c * c, s.r_c += c, s.r_hc2 += hw * c * c, s.r_hc += hw * c;
        sd.r_c2 += double(c) * c, sd.r_c += c, sd.r_hc2 += double(hw) * c * c, sd.r_hc += double(hw) * c;
      } else {
        s.n_c2 += c * c, s.n_c += c, s.n_hc2 += hw * c * c, s.n_hc += hw * c;
        sd.n_c2 += double(c) * c, sd.n_c += c, sd.n_hc2 += double(hw) * c * c, sd.n_hc += double(hw) * c;
      }
      h0 = h1, c0 = c1, l0 = l1;
      h1 = hout, c1 = c * loose, l1 = l1 + (red ? 1 : 0);
    }
    add(c1 * cfg_.num_classes + cfg_.num_classes, c1 * cfg_.num_classes);  // classifier after global pooling
    sum_ = s;
    sum_d_ = sd;
    return f;
  }

  NetConfig cfg_;
  int64_t num_ops_;
  int64_t cell_len_;
  int64_t max_loose_;
  std::vector<Poly> costs_[2];  // [stride 2?][op]
  std::vector<Fixed> fixed_;    // [(L_normal, L_reduction)]
  Sums sum_;
  SumsD sum_d_;
};

// Human-readable name of a position of the flat arch (for error messages).
inline std::string describe_position(int64_t pos, int64_t num_nodes) {
  const int64_t cell_len = 4 * num_nodes;
  static const char* fields[4] = {"x_id", "x_op", "y_id", "y_op"};
  const int64_t cell = pos / cell_len, rest = pos % cell_len;
  return std::string(cell == 0 ? "normal" : "reduction") + " cell, node " + std::to_string(rest / 4 + 2) +
         " (position " + std::to_string(pos) + "), " + fields[rest % 4];
}

}  // namespace size
}  // namespace bnao

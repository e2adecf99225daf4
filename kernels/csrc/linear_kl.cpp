// Native CPU kernel of the fused linear clipped-KL op (contract: kernels/_ops.py, math: kernels/reference.py).
//
// Work is split over the vocabulary: each thread owns a contiguous range of vocabulary tiles and walks all
// tokens in row blocks, so any N (even 1) keeps every thread busy and grad_w needs no reduction. Logit tiles
// [rows, VT] come from at::mm on fp32 sub-blocks (single-threaded BLAS inside the parallel region); nothing of
// size N x V is ever allocated.
//
// Forward, pass 1 (always): online log-sum-exp of both sides, argmax, entropy, and for forward / reverse KL the
//   unclipped divergence kl = (E_w[zw - mw] - E_w[zo - mo]) - log sw + log so (w the weighting side), all in one
//   sweep. Every term is relative to its own side's running max m, never to the other side's logits: the absolute
//   logit level |z| ~ 1/T cancels otherwise, and its fp32 rounding alone (0.06 at |z| = 1e6) exceeds the clip.
//   It also keeps, per (row, tile), the tile's sums and maxima that give its exact sum of l and a bound on each
//   l[v] (see pass1_tile in pointwise.h).
// Forward, pass 2 (only where needed): recompute the tiles whose bound may exceed the clip and sum min(l, clip)
//   and the kept part of g there, term by term as the reference does; the other tiles (no term above the clip)
//   contribute their exact sums from pass 1. JSD has no online form: pass 2 runs on all tiles. With clip = +inf
//   and beta in {0, 1} there is no pass 2 at all.
// Backward: recompute both tiles, dz in place, grad_hs += dz W (per-thread [N, H] buffers, summed at the end),
//   grad_w[tile] += dz^T hs, grad_b[tile] += sum_rows dz.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "pointwise.h"

namespace atesd {
namespace {

// Tile sizes: vocabulary entries per tile and token rows per block; tests shrink them through _set_tiles so that
// small shapes span several ragged tiles. Not meant to be changed while the op runs.
int64_t kVT = 256;
int64_t kRB = 256;
constexpr float kInf = std::numeric_limits<float>::infinity();

int kind_of(double beta) { return beta == 0.0 ? kForward : (beta == 1.0 ? kReverse : kJSD); }

void check_args(const at::Tensor& hs, const at::Tensor& ht, const at::Tensor& w,
                const std::optional<at::Tensor>& wt, const std::optional<at::Tensor>& bs,
                const std::optional<at::Tensor>& bt, double temperature, double clip, double beta) {
  TORCH_CHECK(hs.dim() == 2 && ht.dim() == 2 && ht.size(0) == hs.size(0),
              "atesd_native: hs and ht must be [N, H] and [N, Ht], got ", hs.sizes(), " and ", ht.sizes());
  TORCH_CHECK(w.dim() == 2 && w.size(1) == hs.size(1) && w.size(0) > 0, "atesd_native: w must be [V, H] with H=",
              hs.size(1), " and V > 0, got ", w.sizes());
  TORCH_CHECK(hs.device().is_cpu() && ht.device().is_cpu() && w.device().is_cpu(),
              "atesd_native: tensors must be on the CPU");
  for (const auto& t : {hs, ht, w}) {
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
                "atesd_native: inputs must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  if (wt.has_value()) {
    TORCH_CHECK(wt->dim() == 2 && wt->size(0) == w.size(0) && wt->size(1) == ht.size(1),
                "atesd_native: wt must be [V, Ht]=[", w.size(0), ", ", ht.size(1), "], got ", wt->sizes());
    TORCH_CHECK(wt->device().is_cpu(), "atesd_native: tensors must be on the CPU");
  } else {
    TORCH_CHECK(ht.size(1) == hs.size(1), "atesd_native: ht must be [N, H] when the teacher shares w, got ",
                ht.sizes());
  }
  for (const auto* b : {&bs, &bt}) {
    if (b->has_value()) {
      TORCH_CHECK((*b)->dim() == 1 && (*b)->size(0) == w.size(0), "atesd_native: bias must be [V]=[", w.size(0),
                  "], got ", (*b)->sizes());
    }
  }
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "atesd_native: temperature must be finite and > 0");
  TORCH_CHECK(clip > 0, "atesd_native: clip must be > 0 (+inf: no clipping), got ", clip);
  TORCH_CHECK(beta >= 0 && beta <= 1, "atesd_native: beta must be in [0, 1], got ", beta);
}

// Detached: worker threads do not inherit the caller's no-grad mode, and at::mm_out refuses grad-requiring inputs.
at::Tensor f32(const at::Tensor& t) { return t.detach().to(at::kFloat).contiguous(); }

// Shared inputs of both passes, as fp32 views (hidden states and biases converted once: O(N*H + V)).
struct Inputs {
  at::Tensor hs, ht, w, wt, bs, bt;  // w, wt keep their dtype; wt undefined when the teacher shares w
  int64_t n, h, h_t, v, ntiles;  // h: student width, h_t: teacher width
  float inv_t;
  Inputs(const at::Tensor& hs_, const at::Tensor& ht_, const at::Tensor& w_, const std::optional<at::Tensor>& wt_,
         const std::optional<at::Tensor>& bs_, const std::optional<at::Tensor>& bt_, double temperature)
      : hs(f32(hs_)), ht(f32(ht_)), w(w_.detach().contiguous()), n(hs_.size(0)), h(hs_.size(1)), h_t(ht_.size(1)),
        v(w_.size(0)) {
    if (wt_.has_value()) wt = wt_->detach().contiguous();
    if (bs_.has_value()) bs = f32(*bs_);
    if (bt_.has_value()) bt = f32(*bt_);
    ntiles = (v + kVT - 1) / kVT;
    inv_t = static_cast<float>(1.0 / temperature);
  }
  const float* bias_s(int64_t v0) const { return bs.defined() ? bs.data_ptr<float>() + v0 : nullptr; }
  const float* bias_t(int64_t v0) const { return bt.defined() ? bt.data_ptr<float>() + v0 : nullptr; }
};

// Per-thread scratch: fp32 weight tiles (when w is not fp32) and the two logit tiles.
struct Scratch {
  at::Tensor wbuf, wtbuf, zs, zt;
  explicit Scratch(const Inputs& in) {
    auto opt = at::TensorOptions().dtype(at::kFloat);
    if (in.w.scalar_type() != at::kFloat) wbuf = at::empty({kVT, in.h}, opt);
    if (in.wt.defined() && in.wt.scalar_type() != at::kFloat) wtbuf = at::empty({kVT, in.h_t}, opt);
    zs = at::empty({kRB * kVT}, opt);
    zt = at::empty({kRB * kVT}, opt);
  }
  // fp32 [vt, H] view of rows [v0, v0 + vt) of src, converting into buf when needed.
  static at::Tensor tile(const at::Tensor& src, at::Tensor& buf, int64_t v0, int64_t vt) {
    at::Tensor rows = src.narrow(0, v0, vt);
    if (!buf.defined()) return rows;
    at::Tensor out = buf.narrow(0, 0, vt);
    out.copy_(rows);
    return out;
  }
};

// Splits the vocabulary tiles into contiguous per-thread ranges; returns range boundaries (size slots + 1).
std::vector<int64_t> split_tiles(int64_t ntiles) {
  const int64_t slots = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntiles));
  std::vector<int64_t> b(slots + 1);
  for (int64_t k = 0; k <= slots; ++k) b[k] = k * ntiles / slots;
  return b;
}

// Computes the scaled logit tiles zs, zt for rows [r0, r0 + rb) and the current weight tiles.
void logits(const Inputs& in, Scratch& sc, const at::Tensor& wtile, const at::Tensor& wttile, int64_t v0,
            int64_t vt, int64_t r0, int64_t rb) {
  at::Tensor zs = sc.zs.narrow(0, 0, rb * vt).view({rb, vt});
  at::Tensor zt = sc.zt.narrow(0, 0, rb * vt).view({rb, vt});
  at::mm_out(zs, in.hs.narrow(0, r0, rb), wtile.t());
  at::mm_out(zt, in.ht.narrow(0, r0, rb), wttile.t());
  scale_tile(zs.data_ptr<float>(), rb, vt, in.bias_s(v0), in.inv_t);
  scale_tile(zt.data_ptr<float>(), rb, vt, in.bias_t(v0), in.inv_t);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_kl_fwd(const at::Tensor& hs_, const at::Tensor& ht_, const at::Tensor& w_,
              const std::optional<at::Tensor>& wt_, const std::optional<at::Tensor>& bs_,
              const std::optional<at::Tensor>& bt_, double temperature, double clip_, double beta_) {
  check_args(hs_, ht_, w_, wt_, bs_, bt_, temperature, clip_, beta_);
  at::NoGradGuard no_grad;
  const Inputs in(hs_, ht_, w_, wt_, bs_, bt_, temperature);
  const int64_t n = in.n;
  const int kind = kind_of(beta_);
  const float clip = static_cast<float>(clip_), beta = static_cast<float>(beta_);
  const bool clipped = std::isfinite(clip_);
  const bool bounded = clipped && kind != kJSD;  // sparse pass 2 driven by per-tile bounds
  auto opt = at::TensorOptions().dtype(at::kFloat);
  auto out = [&] { return at::empty({n}, opt); };
  at::Tensor loss = out(), kl = out(), lse_s = out(), lse_t = out(), g = out(), agree = out(), maxp = out(),
             ent = out();
  if (n == 0) return {loss, kl, lse_s, lse_t, g, agree, maxp, ent};

  const std::vector<int64_t> split = split_tiles(in.ntiles);
  const int64_t slots = static_cast<int64_t>(split.size()) - 1;
  // per-slot online state: rows are [slot][field][n]
  enum { MS, SS, ES, MT, ST, ET, A, NF };
  at::Tensor state = at::empty({slots, NF, n}, opt);
  at::Tensor idx = at::zeros({slots, 2, n}, at::TensorOptions().dtype(at::kLong));
  // per (row, tile): max zw, max u, mw, mo, sum p u, sum p (see pass1_tile): O(N * V / VT)
  enum { B_WMAX, B_UMAX, B_MW, B_MO, B_TA, B_TS, NB };
  at::Tensor bound = bounded ? at::empty({NB, n, in.ntiles}, opt) : at::Tensor();
  const int64_t pitch = n * in.ntiles;

  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      Scratch sc(in);
      float* st = state[s].data_ptr<float>();
      for (int f : {MS, MT}) std::fill(st + f * n, st + (f + 1) * n, -kInf);
      for (int f : {SS, ES, ST, ET, A}) std::fill(st + f * n, st + (f + 1) * n, 0.f);
      int64_t* ix = idx[s].data_ptr<int64_t>();
      for (int64_t tile = split[s]; tile < split[s + 1]; ++tile) {
        const int64_t v0 = tile * kVT, vt = std::min(kVT, in.v - v0);
        at::Tensor wtile = Scratch::tile(in.w, sc.wbuf, v0, vt);
        at::Tensor wttile = in.wt.defined() ? Scratch::tile(in.wt, sc.wtbuf, v0, vt) : wtile;
        for (int64_t r0 = 0; r0 < n; r0 += kRB) {
          const int64_t rb = std::min(kRB, n - r0);
          logits(in, sc, wtile, wttile, v0, vt, r0, rb);
          float* bd = bounded ? bound.data_ptr<float>() + r0 * in.ntiles + tile : nullptr;
          pass1_tile(sc.zs.data_ptr<float>(), sc.zt.data_ptr<float>(), rb, vt, v0, kind, st + MS * n + r0,
                     st + SS * n + r0, st + ES * n + r0, ix + r0, st + MT * n + r0, st + ST * n + r0,
                     st + ET * n + r0, ix + n + r0, st + A * n + r0, bd, in.ntiles, pitch);
        }
      }
    }
  });

  // Merge the slots in vocabulary order (first index wins argmax ties), then finish the per-row statistics.
  float* L = loss.data_ptr<float>();
  float* K = kl.data_ptr<float>();
  float* LS = lse_s.data_ptr<float>();
  float* LT = lse_t.data_ptr<float>();
  float* G = g.data_ptr<float>();
  float* AG = agree.data_ptr<float>();
  float* MP = maxp.data_ptr<float>();
  float* EN = ent.data_ptr<float>();
  const float* S0 = state.data_ptr<float>();
  const int64_t* I0 = idx.data_ptr<int64_t>();
  const bool fwd = kind == kForward;
  at::parallel_for(0, n, 1024, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      auto at_ = [&](int64_t s, int f) { return S0[(s * NF + f) * n + i]; };
      float ms = at_(0, MS), ss = at_(0, SS), es = at_(0, ES), mt = at_(0, MT), st = at_(0, ST), et = at_(0, ET);
      float a = at_(0, A);
      int64_t is = I0[i], it = I0[n + i];
      for (int64_t s = 1; s < slots; ++s) {
        const float ms2 = at_(s, MS), mt2 = at_(s, MT), ss2 = at_(s, SS), st2 = at_(s, ST);
        const float m = std::max(ms, ms2), c1 = std::exp(ms - m), c2 = std::exp(ms2 - m);
        const float mtn = std::max(mt, mt2), d1 = std::exp(mt - mtn), d2 = std::exp(mt2 - mtn);
        // a (weights of side w, offsets of side o) rebased to the merged maxima of both sides
        if (fwd) {
          a = d1 * (a - (m - ms) * st) + d2 * (at_(s, A) - (m - ms2) * st2);
        } else {
          a = c1 * (a - (mtn - mt) * ss) + c2 * (at_(s, A) - (mtn - mt2) * ss2);
        }
        es = c1 * (es - (m - ms) * ss) + c2 * (at_(s, ES) - (m - ms2) * ss2);
        et = d1 * (et - (mtn - mt) * st) + d2 * (at_(s, ET) - (mtn - mt2) * st2);
        ss = c1 * ss + c2 * ss2;
        st = d1 * st + d2 * st2;
        if (ms2 > ms) is = I0[(s * 2) * n + i];
        if (mt2 > mt) it = I0[(s * 2 + 1) * n + i];
        ms = m;
        mt = mtn;
      }
      LS[i] = ms + std::log(ss);
      LT[i] = mt + std::log(st);
      AG[i] = is == it ? 1.f : 0.f;
      MP[i] = 1.f / ss;
      EN[i] = std::log(ss) - es / ss;
      // kl = E_w[log pw - log po] = (E_w[zw - mw] - E_w[zo - mo]) - log sw + log so; the unclipped g is
      // sum_v gp_v = -1 (forward) or kl + 1 (reverse); a NaN row still gets a NaN gradient through lse_s / lse_t
      if (kind == kForward) {
        K[i] = (et - a) / st - std::log(st) + std::log(ss);
        G[i] = -1.f;
      } else if (kind == kReverse) {
        K[i] = (es - a) / ss - std::log(ss) + std::log(st);
        G[i] = K[i] + 1.f;
      } else {
        K[i] = 0.f;
        G[i] = 0.f;
      }
      L[i] = K[i];
    }
  });
  if (!clipped && kind != kJSD) return {loss, kl, lse_s, lse_t, g, agree, maxp, ent};

  // Pass 2: exact pointwise sums on the tiles that need them, pass-1 sums on the others.
  at::Tensor acc = at::zeros({slots, 3, n}, opt);  // sum_l (JSD's kl), sum min(l, clip), sum of kept gp
  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      Scratch sc(in);
      float* ac = acc[s].data_ptr<float>();
      const float* bd = bounded ? bound.data_ptr<float>() : nullptr;
      const float* lw = fwd ? LT : LS;
      const float* lo = fwd ? LS : LT;
      constexpr float kEps = std::numeric_limits<float>::epsilon();
      for (int64_t tile = split[s]; tile < split[s + 1]; ++tile) {
        const int64_t v0 = tile * kVT, vt = std::min(kVT, in.v - v0);
        at::Tensor wtile, wttile;
        for (int64_t r0 = 0; r0 < n; r0 += kRB) {
          const int64_t rb = std::min(kRB, n - r0);
          if (bounded) {
            // l[v] = exp(zw - lw) (u_v + c) <= exp(max zw - lw) (max u + c), c = (mw - lw) - (mo - lo). The slack
            // covers the rounding of the recomputed terms: 1e-3 relative, plus a few ulp of the logit level, which
            // decides alone at extreme temperatures (there every tile that matters is recomputed, like the reference).
            bool need = false;
            for (int64_t i = r0; i < r0 + rb && !need; ++i) {
              const int64_t k = i * in.ntiles + tile;
              const float c = (bd[B_MW * pitch + k] - lw[i]) - (bd[B_MO * pitch + k] - lo[i]);
              const float d = bd[B_UMAX * pitch + k] + c;
              const float slack = 8.f * kEps * (std::fabs(lw[i]) + std::fabs(lo[i]) + std::fabs(bd[B_MW * pitch + k]) +
                                                std::fabs(bd[B_MO * pitch + k]));
              need = d + slack > 0.f && std::exp(bd[B_WMAX * pitch + k] - lw[i]) * (d * 1.001f + slack) >= clip;
            }
            if (!need) {
              // every l[v] of the tile is <= clip: its exact sum exp(mw - lw) (sum p u + c sum p), and the kept gp
              // sum: -sum pt (forward) or sum (l + ps) (reverse)
              for (int64_t i = r0; i < r0 + rb; ++i) {
                const int64_t k = i * in.ntiles + tile;
                const float c = (bd[B_MW * pitch + k] - lw[i]) - (bd[B_MO * pitch + k] - lo[i]);
                const float scale = std::exp(bd[B_MW * pitch + k] - lw[i]);
                const float sum_l = scale * (bd[B_TA * pitch + k] + c * bd[B_TS * pitch + k]);
                const float mass = scale * bd[B_TS * pitch + k];
                ac[n + i] += sum_l;
                ac[2 * n + i] += fwd ? -mass : sum_l + mass;
              }
              continue;
            }
          }
          if (!wtile.defined()) {
            wtile = Scratch::tile(in.w, sc.wbuf, v0, vt);
            wttile = in.wt.defined() ? Scratch::tile(in.wt, sc.wtbuf, v0, vt) : wtile;
          }
          logits(in, sc, wtile, wttile, v0, vt, r0, rb);
          pass2_tile(sc.zs.data_ptr<float>(), sc.zt.data_ptr<float>(), rb, vt, kind, beta, clip, LS + r0, LT + r0,
                     ac + r0, ac + n + r0, ac + 2 * n + r0);
        }
      }
    }
  });
  at::Tensor tot = acc.sum(0);  // [3, n]
  const float* T = tot.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    if (kind == kJSD) K[i] = T[i];
    L[i] = T[n + i];      // sum of min(l, clip), term by term or from exact tile sums: no cancellation against kl
    G[i] = T[2 * n + i];
  }
  return {loss, kl, lse_s, lse_t, g, agree, maxp, ent};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_kl_bwd(
    const at::Tensor& grad_, const at::Tensor& hs_, const at::Tensor& ht_, const at::Tensor& w_,
    const std::optional<at::Tensor>& wt_, const std::optional<at::Tensor>& bs_,
    const std::optional<at::Tensor>& bt_, const at::Tensor& lse_s_, const at::Tensor& lse_t_, const at::Tensor& g_,
    double temperature, double clip_, double beta_, bool need_grad_w, bool need_grad_b) {
  check_args(hs_, ht_, w_, wt_, bs_, bt_, temperature, clip_, beta_);
  const int64_t n = hs_.size(0);
  for (const auto* t : {&grad_, &lse_s_, &lse_t_, &g_}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "atesd_native: per-token tensors must be [N]=[", n, "], got ",
                t->sizes());
  }
  at::NoGradGuard no_grad;
  const Inputs in(hs_, ht_, w_, wt_, bs_, bt_, temperature);
  const at::Tensor grad = f32(grad_), lse_s = f32(lse_s_), lse_t = f32(lse_t_), g = f32(g_);
  const int kind = kind_of(beta_);
  const float clip = static_cast<float>(clip_), beta = static_cast<float>(beta_);
  auto opt = at::TensorOptions().dtype(at::kFloat);
  at::Tensor grad_w = need_grad_w ? at::zeros({in.v, in.h}, opt) : at::empty({0}, opt);
  at::Tensor grad_b = need_grad_b ? at::zeros({in.v}, opt) : at::empty({0}, opt);
  const std::vector<int64_t> split = split_tiles(in.ntiles);
  const int64_t slots = static_cast<int64_t>(split.size()) - 1;
  at::Tensor ghs = at::zeros({slots, n, in.h}, opt);  // per-thread grad_hs: O(threads * N * H)
  if (n == 0) return {at::zeros_like(hs_), grad_w, grad_b};

  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      Scratch sc(in);
      at::Tensor gh = ghs[s];
      for (int64_t tile = split[s]; tile < split[s + 1]; ++tile) {
        const int64_t v0 = tile * kVT, vt = std::min(kVT, in.v - v0);
        at::Tensor wtile = Scratch::tile(in.w, sc.wbuf, v0, vt);
        at::Tensor wttile = in.wt.defined() ? Scratch::tile(in.wt, sc.wtbuf, v0, vt) : wtile;
        for (int64_t r0 = 0; r0 < n; r0 += kRB) {
          const int64_t rb = std::min(kRB, n - r0);
          logits(in, sc, wtile, wttile, v0, vt, r0, rb);
          float* dz = sc.zs.data_ptr<float>();
          grad_tile(dz, sc.zt.data_ptr<float>(), rb, vt, kind, beta, clip, lse_s.data_ptr<float>() + r0,
                    lse_t.data_ptr<float>() + r0, grad.data_ptr<float>() + r0, g.data_ptr<float>() + r0, in.inv_t);
          at::Tensor dzt = sc.zs.narrow(0, 0, rb * vt).view({rb, vt});
          gh.narrow(0, r0, rb).addmm_(dzt, wtile);
          if (need_grad_w) grad_w.narrow(0, v0, vt).addmm_(dzt.t(), in.hs.narrow(0, r0, rb));
          if (need_grad_b) {
            float* gb = grad_b.data_ptr<float>() + v0;
            for (int64_t i = 0; i < rb; ++i) {
#pragma omp simd
              for (int64_t j = 0; j < vt; ++j) gb[j] += dz[i * vt + j];
            }
          }
        }
      }
    }
  });
  at::Tensor grad_hs = slots == 1 ? ghs[0] : ghs.sum(0);
  return {grad_hs.to(hs_.scalar_type()), grad_w, grad_b};
}

std::vector<int64_t> set_tiles(int64_t rows, int64_t cols) {
  TORCH_CHECK(rows > 0 && cols > 0, "atesd_native: tile sizes must be > 0, got ", rows, " x ", cols);
  std::vector<int64_t> old{kRB, kVT};
  kRB = rows;
  kVT = cols;
  return old;
}

}  // namespace
}  // namespace atesd

TORCH_LIBRARY(atesd_native, m) {
  m.def(
      "linear_kl_fwd(Tensor hs, Tensor ht, Tensor w, Tensor? wt, Tensor? bs, Tensor? bt, float temperature, "
      "float clip, float beta) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_kl_bwd(Tensor grad, Tensor hs, Tensor ht, Tensor w, Tensor? wt, Tensor? bs, Tensor? bt, "
      "Tensor lse_s, Tensor lse_t, Tensor g, float temperature, float clip, float beta, bool need_grad_w, "
      "bool need_grad_b) -> (Tensor, Tensor, Tensor)");
  m.def("_set_tiles(int rows, int cols) -> int[]", &atesd::set_tiles);  // returns the previous (rows, cols)
}

TORCH_LIBRARY_IMPL(atesd_native, CPU, m) {
  m.impl("linear_kl_fwd", &atesd::linear_kl_fwd);
  m.impl("linear_kl_bwd", &atesd::linear_kl_bwd);
}

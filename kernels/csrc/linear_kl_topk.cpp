// Native CPU kernel of the top-k op's student side (contract: kernels/_ops_topk.py, math: kernels/reference.py).
//
// The teacher is K ids and log-probs per token, so the only vocabulary-sized work is the student's log-softmax.
// As in linear_kl.cpp, each thread owns a contiguous range of vocabulary tiles and walks all tokens in row blocks
// (any N keeps every thread busy; grad_w needs no reduction); logit tiles come from at::mm on fp32 sub-blocks.
//
// Forward: per tile, the entries at each row's K ids are masked and an online log-sum-exp (plus the max,
//   first argmax and entropy sum) runs over the others, per thread; the threads' states are merged in vocabulary
//   order. The K logits at the ids are a gather (K dot products per row). Nothing of size N x V is allocated.
// Backward: recompute each tile, dz = coef exp(z - lse_tail) outside the ids (0 at them), grad_hs += dz W
//   (per-thread [N, H] buffers, summed at the end), grad_w[tile] += dz^T hs, grad_b[tile] += sum_rows dz; then
//   the K entries: each thread adds grad_z[n, k] at the ids inside its own vocabulary range.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
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

// Vocabulary entries per tile and token rows per block; tests shrink them through _set_topk_tiles so that small
// shapes span several ragged tiles. Not meant to be changed while the op runs.
int64_t kVT = 256;
int64_t kRB = 256;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Detached fp32 contiguous copy (worker threads do not inherit no-grad mode; at::mm_out refuses grad inputs).
at::Tensor f32(const at::Tensor& t) { return t.detach().to(at::kFloat).contiguous(); }

std::vector<int64_t> split_tiles(int64_t ntiles) {
  const int64_t slots = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntiles));
  std::vector<int64_t> b(slots + 1);
  for (int64_t k = 0; k <= slots; ++k) b[k] = k * ntiles / slots;
  return b;
}

void check_args(const at::Tensor& hs, const at::Tensor& w, const std::optional<at::Tensor>& bs, const at::Tensor& ids,
                double temperature) {
  TORCH_CHECK(hs.dim() == 2 && w.dim() == 2 && w.size(1) == hs.size(1) && w.size(0) > 0,
              "atesd_native: hs must be [N, H] and w [V > 0, H], got ", hs.sizes(), " and ", w.sizes());
  TORCH_CHECK(hs.device().is_cpu() && w.device().is_cpu() && ids.device().is_cpu(),
              "atesd_native: tensors must be on the CPU");
  for (const auto& t : {hs, w}) {
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
                "atesd_native: inputs must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == hs.size(0) && ids.size(1) >= 1 && ids.size(1) <= w.size(0),
              "atesd_native: ids must be [N, K] with 1 <= K <= V, got ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong, "atesd_native: ids must be int64, got ", ids.scalar_type());
  if (bs.has_value()) {
    TORCH_CHECK(bs->dim() == 1 && bs->size(0) == w.size(0), "atesd_native: bias must be [V]=[", w.size(0),
                "], got ", bs->sizes());
  }
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "atesd_native: temperature must be finite and > 0");
  // out-of-range ids would read outside the head: refuse them here whatever the caller checked
  const int64_t* I = ids.data_ptr<int64_t>();
  const int64_t v = w.size(0);
  for (int64_t i = 0; i < ids.numel(); ++i) {
    TORCH_CHECK(I[i] >= 0 && I[i] < v, "atesd_native: ids must lie in [0, ", v, "), got ", I[i]);
  }
}

// The student side's inputs: fp32 hidden states and bias (converted once), the head in its own dtype.
struct Inputs {
  at::Tensor hs, w, bs, ids;
  int64_t n, h, v, k, ntiles;
  float inv_t;
  Inputs(const at::Tensor& hs_, const at::Tensor& w_, const std::optional<at::Tensor>& bs_, const at::Tensor& ids_,
         double temperature)
      : hs(f32(hs_)), w(w_.detach().contiguous()), ids(ids_.contiguous()), n(hs_.size(0)), h(hs_.size(1)),
        v(w_.size(0)), k(ids_.size(1)) {
    if (bs_.has_value()) bs = f32(*bs_);
    ntiles = (v + kVT - 1) / kVT;
    inv_t = static_cast<float>(1.0 / temperature);
  }
};

// Per-thread scratch: an fp32 weight tile (when w is not fp32) and one logit tile.
struct Scratch {
  at::Tensor wbuf, z;
  explicit Scratch(const Inputs& in) {
    auto opt = at::TensorOptions().dtype(at::kFloat);
    if (in.w.scalar_type() != at::kFloat) wbuf = at::empty({kVT, in.h}, opt);
    z = at::empty({kRB * kVT}, opt);
  }
  at::Tensor tile(const at::Tensor& src, int64_t v0, int64_t vt) {
    at::Tensor rows = src.narrow(0, v0, vt);
    if (!wbuf.defined()) return rows;
    at::Tensor out = wbuf.narrow(0, 0, vt);
    out.copy_(rows);
    return out;
  }
};

// Scaled logits (hs w^T + b) / T of rows [r0, r0 + rb) and tile [v0, v0 + vt), the entries at each row's ids
// set to kMasked; returns the tile's data (row-major [rb, vt]).
float* masked_logits(const Inputs& in, Scratch& sc, const at::Tensor& wtile, int64_t v0, int64_t vt, int64_t r0,
                     int64_t rb) {
  at::Tensor z = sc.z.narrow(0, 0, rb * vt).view({rb, vt});
  at::mm_out(z, in.hs.narrow(0, r0, rb), wtile.t());
  float* zp = z.data_ptr<float>();
  scale_tile(zp, rb, vt, in.bs.defined() ? in.bs.data_ptr<float>() + v0 : nullptr, in.inv_t);
  const int64_t* I = in.ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < rb; ++i) {
    const int64_t* row = I + (r0 + i) * in.k;
    for (int64_t j = 0; j < in.k; ++j) {
      const int64_t c = row[j] - v0;
      if (c >= 0 && c < vt) zp[i * vt + c] = kMasked;
    }
  }
  return zp;
}

// z[n, k] = (hs[n] . w[ids[n, k]] + b[ids[n, k]]) / T; and, for the backward, the sparse head rows.
template <typename scalar_t>
float dot_row(const float* x, const scalar_t* wrow, int64_t h) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < h; ++j) acc += x[j] * static_cast<float>(wrow[j]);
  return acc;
}

at::Tensor gather_logits(const Inputs& in) {
  at::Tensor z = at::empty({in.n, in.k}, at::TensorOptions().dtype(at::kFloat));
  float* Z = z.data_ptr<float>();
  const float* H = in.hs.data_ptr<float>();
  const int64_t* I = in.ids.data_ptr<int64_t>();
  const float* B = in.bs.defined() ? in.bs.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.w.scalar_type(), "atesd_topk_gather", [&] {
    const scalar_t* W = in.w.data_ptr<scalar_t>();
    at::parallel_for(0, in.n, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = 0; j < in.k; ++j) {
          const int64_t id = I[i * in.k + j];
          const float acc = dot_row(H + i * in.h, W + id * in.h, in.h) + (B ? B[id] : 0.f);
          Z[i * in.k + j] = acc * in.inv_t;
        }
      }
    });
  });
  return z;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_kl_topk_fwd(
    const at::Tensor& hs_, const at::Tensor& w_, const std::optional<at::Tensor>& bs_, const at::Tensor& ids_,
    double temperature) {
  check_args(hs_, w_, bs_, ids_, temperature);
  at::NoGradGuard no_grad;
  const Inputs in(hs_, w_, bs_, ids_, temperature);
  const int64_t n = in.n;
  auto opt = at::TensorOptions().dtype(at::kFloat);
  at::Tensor lse_tail = at::empty({n}, opt), tail_max = at::empty({n}, opt), tail_ent = at::empty({n}, opt);
  at::Tensor tail_arg = at::zeros({n}, at::TensorOptions().dtype(at::kLong));
  if (n == 0) return {at::empty({0, in.k}, opt), lse_tail, tail_max, tail_arg, tail_ent};
  at::Tensor z_topk = gather_logits(in);

  const std::vector<int64_t> split = split_tiles(in.ntiles);
  const int64_t slots = static_cast<int64_t>(split.size()) - 1;
  enum { M, S, E, NF };
  at::Tensor state = at::empty({slots, NF, n}, opt);
  at::Tensor idx = at::zeros({slots, n}, at::TensorOptions().dtype(at::kLong));
  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      Scratch sc(in);
      float* st = state[s].data_ptr<float>();
      std::fill(st + M * n, st + (M + 1) * n, -kInf);
      std::fill(st + S * n, st + NF * n, 0.f);
      int64_t* ix = idx[s].data_ptr<int64_t>();
      for (int64_t tile = split[s]; tile < split[s + 1]; ++tile) {
        const int64_t v0 = tile * kVT, vt = std::min(kVT, in.v - v0);
        at::Tensor wtile = sc.tile(in.w, v0, vt);
        for (int64_t r0 = 0; r0 < n; r0 += kRB) {
          const int64_t rb = std::min(kRB, n - r0);
          const float* z = masked_logits(in, sc, wtile, v0, vt, r0, rb);
          tail_online_tile(z, rb, vt, v0, st + M * n + r0, st + S * n + r0, st + E * n + r0, ix + r0);
        }
      }
    }
  });

  // Merge the threads' states in vocabulary order (the first index wins argmax ties); a state with s == 0 saw
  // nothing unmasked. lse_tail = m + log s (-inf for an empty tail), tail_ent = log s - e / s.
  const float* S0 = state.data_ptr<float>();
  const int64_t* I0 = idx.data_ptr<int64_t>();
  float* LT = lse_tail.data_ptr<float>();
  float* TM = tail_max.data_ptr<float>();
  float* TE = tail_ent.data_ptr<float>();
  int64_t* TA = tail_arg.data_ptr<int64_t>();
  at::parallel_for(0, n, 1024, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float m = S0[M * n + i], sm = S0[S * n + i], e = S0[E * n + i];
      int64_t a = I0[i];
      for (int64_t s = 1; s < slots; ++s) {
        const float m2 = S0[(s * NF + M) * n + i], s2 = S0[(s * NF + S) * n + i], e2 = S0[(s * NF + E) * n + i];
        if (m2 > m) a = I0[s * n + i];
        if (s2 == 0.f) continue;  // nothing unmasked there (a NaN s2 is merged, and propagates)
        if (sm == 0.f) {
          m = m2, sm = s2, e = e2;
          continue;
        }
        const float mn = std::max(m, m2), c1 = std::exp(m - mn), c2 = std::exp(m2 - mn);
        e = c1 * (e - (mn - m) * sm) + c2 * (e2 - (mn - m2) * s2);
        sm = c1 * sm + c2 * s2;
        m = mn;
      }
      LT[i] = sm == 0.f ? -kInf : m + std::log(sm);
      TE[i] = std::log(sm) - e / sm;
      TM[i] = m;
      TA[i] = a;
    }
  });
  return {z_topk, lse_tail, tail_max, tail_arg, tail_ent};
}

// The K entries of the backward for the ids in [lo, hi): grad_hs[i] += g W[id], grad_w[id] += g hs[i],
// grad_b[id] += g with g = G[i, j] (already divided by T); a zero entry adds nothing (NaN rows included).
template <typename scalar_t>
void sparse_bwd(const scalar_t* W, const int64_t* I, const float* G, const float* Hs, int64_t n, int64_t k, int64_t h,
                int64_t lo, int64_t hi, float* GH, float* GW, float* GB) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t id = I[i * k + j];
      const float g = G[i * k + j];
      if (id < lo || id >= hi || g == 0.f) continue;
      const scalar_t* wrow = W + id * h;
      float* ghrow = GH + i * h;
#pragma omp simd
      for (int64_t c = 0; c < h; ++c) ghrow[c] += g * static_cast<float>(wrow[c]);
      if (GW) {
        float* gwrow = GW + id * h;
        const float* hrow = Hs + i * h;
#pragma omp simd
        for (int64_t c = 0; c < h; ++c) gwrow[c] += g * hrow[c];
      }
      if (GB) GB[id] += g;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_kl_topk_bwd(
    const at::Tensor& grad_lse_tail_, const at::Tensor& grad_z_, const at::Tensor& hs_, const at::Tensor& w_,
    const std::optional<at::Tensor>& bs_, const at::Tensor& ids_, const at::Tensor& lse_tail_, double temperature,
    bool need_grad_w, bool need_grad_b) {
  check_args(hs_, w_, bs_, ids_, temperature);
  const int64_t n = hs_.size(0), k = ids_.size(1);
  TORCH_CHECK(grad_lse_tail_.dim() == 1 && grad_lse_tail_.size(0) == n && lse_tail_.dim() == 1 &&
                  lse_tail_.size(0) == n,
              "atesd_native: grad_lse_tail and lse_tail must be [N]=[", n, "]");
  TORCH_CHECK(grad_z_.dim() == 2 && grad_z_.size(0) == n && grad_z_.size(1) == k,
              "atesd_native: grad_z must be [N, K]=[", n, ", ", k, "], got ", grad_z_.sizes());
  at::NoGradGuard no_grad;
  const Inputs in(hs_, w_, bs_, ids_, temperature);
  auto opt = at::TensorOptions().dtype(at::kFloat);
  at::Tensor grad_w = need_grad_w ? at::zeros({in.v, in.h}, opt) : at::empty({0}, opt);
  at::Tensor grad_b = need_grad_b ? at::zeros({in.v}, opt) : at::empty({0}, opt);
  if (n == 0) return {at::zeros_like(hs_), grad_w, grad_b};
  // the 1/T of dz = d(loss)/d(logit) * dlogit/d(h.w) folded into the per-row and per-entry coefficients
  const at::Tensor coef = f32(grad_lse_tail_) * in.inv_t, gz = f32(grad_z_) * in.inv_t;  // new tensors
  const at::Tensor lse_tail = f32(lse_tail_);
  const std::vector<int64_t> split = split_tiles(in.ntiles);
  const int64_t slots = static_cast<int64_t>(split.size()) - 1;
  at::Tensor ghs = at::zeros({slots, n, in.h}, opt);  // per-thread grad_hs: O(threads * N * H)

  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      Scratch sc(in);
      at::Tensor gh = ghs[s];
      for (int64_t tile = split[s]; tile < split[s + 1]; ++tile) {
        const int64_t v0 = tile * kVT, vt = std::min(kVT, in.v - v0);
        at::Tensor wtile = sc.tile(in.w, v0, vt);
        for (int64_t r0 = 0; r0 < n; r0 += kRB) {
          const int64_t rb = std::min(kRB, n - r0);
          float* dz = masked_logits(in, sc, wtile, v0, vt, r0, rb);
          tail_grad_tile(dz, rb, vt, lse_tail.data_ptr<float>() + r0, coef.data_ptr<float>() + r0);
          at::Tensor dzt = sc.z.narrow(0, 0, rb * vt).view({rb, vt});
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
      // the K entries at the ids inside this thread's vocabulary range: dz = grad_z / T
      const int64_t lo = split[s] * kVT, hi = std::min(split[s + 1] * kVT, in.v);
      const int64_t* I = in.ids.data_ptr<int64_t>();
      const float* G = gz.data_ptr<float>();
      const float* Hs = in.hs.data_ptr<float>();
      float* GH = gh.data_ptr<float>();
      float* GW = need_grad_w ? grad_w.data_ptr<float>() : nullptr;
      float* GB = need_grad_b ? grad_b.data_ptr<float>() : nullptr;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.w.scalar_type(), "atesd_topk_sparse_bwd", [&] {
        sparse_bwd(in.w.data_ptr<scalar_t>(), I, G, Hs, n, k, in.h, lo, hi, GH, GW, GB);
      });
    }
  });
  at::Tensor grad_hs = slots == 1 ? ghs[0] : ghs.sum(0);
  return {grad_hs.to(hs_.scalar_type()), grad_w, grad_b};
}

std::vector<int64_t> set_topk_tiles(int64_t rows, int64_t cols) {
  TORCH_CHECK(rows > 0 && cols > 0, "atesd_native: tile sizes must be > 0, got ", rows, " x ", cols);
  std::vector<int64_t> old{kRB, kVT};
  kRB = rows;
  kVT = cols;
  return old;
}

}  // namespace
}  // namespace atesd

// A fragment of the library linear_kl.cpp declares (one TORCH_LIBRARY per namespace).
TORCH_LIBRARY_FRAGMENT(atesd_native, m) {
  m.def("linear_kl_topk_fwd(Tensor hs, Tensor w, Tensor? bs, Tensor ids, float temperature) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_kl_topk_bwd(Tensor grad_lse_tail, Tensor grad_z, Tensor hs, Tensor w, Tensor? bs, Tensor ids, "
        "Tensor lse_tail, float temperature, bool need_grad_w, bool need_grad_b) -> (Tensor, Tensor, Tensor)");
  m.def("_set_topk_tiles(int rows, int cols) -> int[]", &atesd::set_topk_tiles);  // returns the previous (rows, cols)
}

TORCH_LIBRARY_IMPL(atesd_native, CPU, m) {
  m.impl("linear_kl_topk_fwd", &atesd::linear_kl_topk_fwd);
  m.impl("linear_kl_topk_bwd", &atesd::linear_kl_topk_bwd);
}

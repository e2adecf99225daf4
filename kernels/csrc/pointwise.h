// Per-tile pointwise work of the native clipped-KL kernel: the part that is not a GEMM.
//
// Each function takes logit tiles zs, zt (row-major [rows, vt], already scaled: z = (h.w + b) / T) and
// updates per-row accumulators. They are compiled for the baseline ISA and for x86-64-v3 (AVX2 + FMA) with
// GCC target_clones, so one binary runs everywhere and uses AVX2 where the CPU has it.
#pragma once

#include <cstdint>

namespace atesd {

// Divergence kind: forward KL (beta = 0), reverse KL (beta = 1), generalized JSD (0 < beta < 1).
enum Kind : int { kForward = 0, kReverse = 1, kJSD = 2 };

// z[i, j] = (z[i, j] + b[j]) * inv_t in place; b may be null.
void scale_tile(float* z, int64_t rows, int64_t vt, const float* b, float inv_t);

// Online pass over one tile. Per row i: student max ms / sum ss = sum exp(zs - ms) / es = sum exp(zs - ms)(zs - ms)
// / first argmax is; the same for the teacher (mt, st, et, it). For forward / reverse KL also the cross term
// a = sum exp(zw - mw)(zo - mo), with (w, o) = (teacher, student) for forward KL and (student, teacher) for reverse
// KL: each side relative to its own running max, so that no term carries the absolute logit level (|z| ~ 1/T,
// whose fp32 rounding alone exceeds a clip of 0.05 at T = 1e-6). Unused for JSD. v0 is the tile's first vocabulary
// index. When bound is non-null, six per-(row, tile) fields are written at bound[f * pitch + i * ldb]: max_j zw,
// max_j u_j, the running maxima mw and mo after this tile, sum_j p_j u_j and sum_j p_j, with
// p_j = exp(zw_j - mw) and u_j = (zw_j - mw) - (zo_j - mo) (the tile's sum of l, and a bound on each l; linear_kl.cpp).
void pass1_tile(const float* zs, const float* zt, int64_t rows, int64_t vt, int64_t v0, int kind,
                float* ms, float* ss, float* es, int64_t* is, float* mt, float* st, float* et, int64_t* it,
                float* a, float* bound, int64_t ldb, int64_t pitch);

// Exact pass over one tile once lse_s, lse_t are final. Per row adds: sum_l += sum_j l,
// sum_clipped += sum_j min(l, clip), sum_gp += sum_j c_j gp_j with c_j = [not (l_j > clip)] (NaN terms are kept
// and propagate) and gp = dl/dlog ps (see _ops.py).
void pass2_tile(const float* zs, const float* zt, int64_t rows, int64_t vt, int kind, float beta, float clip,
                const float* lse_s, const float* lse_t, float* sum_l, float* sum_clipped, float* sum_gp);

// Logit gradient of one tile, written over zs: dz = grad * (c gp - ps g) * inv_t with c = [not (l > clip)]; rows
// with grad == 0 get exactly 0.
void grad_tile(float* zs, const float* zt, int64_t rows, int64_t vt, int kind, float beta, float clip,
               const float* lse_s, const float* lse_t, const float* grad, const float* g, float inv_t);

// Top-k op (linear_kl_topk.cpp): the caller overwrites the entries of each row that are among its teacher ids
// with kMasked (finite, so that a genuine -inf logit stays distinguishable).
constexpr float kMasked = -3.4028234663852886e38f;  // lowest float

// Online log-sum-exp over the unmasked entries of one tile: per row i, running max m, s = sum exp(z - m),
// e = sum exp(z - m)(z - m) and the first argmax idx (v0: the tile's first vocabulary index). A row whose entries
// so far are all masked keeps m = -inf and s = 0; an unmasked entry that is not finite (NaN, +-inf: from a
// non-finite input) makes s NaN, so the row's log-sum-exp, loss and gradient are NaN.
void tail_online_tile(const float* z, int64_t rows, int64_t vt, int64_t v0, float* m, float* s, float* e,
                      int64_t* idx);

// Logit gradient of the unmasked entries, written over z: coef[i] * exp(z - lse_tail[i]), 0 at masked entries and
// on rows with coef == 0 (whatever their logits hold).
void tail_grad_tile(float* z, int64_t rows, int64_t vt, const float* lse_tail, const float* coef);

}  // namespace atesd

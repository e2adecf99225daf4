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
// / first argmax is; the same for the teacher (mt, st, it); a = sum exp(zw - mw) * d with (zw, d) = (zt, zt - zs)
// for forward KL and (zs, zs - zt) for reverse KL (unused for JSD). v0 is the tile's first vocabulary index.
// When bound is non-null, five per-(row, tile) fields are written at bound[f * pitch + i * ldb]: max_j zw,
// max_j d, the reference max mw, sum_j exp(zw - mw) d and sum_j exp(zw - mw) (this tile's part of the online sums).
void pass1_tile(const float* zs, const float* zt, int64_t rows, int64_t vt, int64_t v0, int kind,
                float* ms, float* ss, float* es, int64_t* is, float* mt, float* st, int64_t* it, float* a,
                float* bound, int64_t ldb, int64_t pitch);

// Exact pass over one tile once lse_s, lse_t are final. Per row adds: sum_l += sum_j l, sum_gp += sum_j gp,
// excess += sum_j max(l - clip, 0), gclip += sum_j [l > clip] gp; gp = dl/dlog ps (see _ops.py).
void pass2_tile(const float* zs, const float* zt, int64_t rows, int64_t vt, int kind, float beta, float clip,
                const float* lse_s, const float* lse_t, float* sum_l, float* sum_gp, float* excess, float* gclip);

// Logit gradient of one tile, written over zs: dz = grad * (c gp - ps g) * inv_t with c = [l <= clip].
void grad_tile(float* zs, const float* zt, int64_t rows, int64_t vt, int kind, float beta, float clip,
               const float* lse_s, const float* lse_t, const float* grad, const float* g, float inv_t);

}  // namespace atesd

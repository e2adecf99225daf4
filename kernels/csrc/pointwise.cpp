// Pointwise tile functions of the native clipped-KL kernel (see pointwise.h).
#include "pointwise.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(ATESD_NO_CLONES)
#define ATESD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ATESD_CLONES
#endif

namespace atesd {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) to ~2 ulp (Cephes polynomial), branch-free so loops over it vectorise; x <= 0 in every use here,
// and inputs below -87.3 give 1.2e-38 rather than 0, harmless in sums whose largest term is 1. NaN in, NaN out
// (a non-finite input must reach the loss, _ops.py); the clamp maps NaN to -87.3 first, so that the float-to-int
// conversion below never sees it.
inline float fast_exp(float x) {
  const float xc = std::min(std::max(-87.3365478515625f, x), 88.3762626647949f);  // max(c, NaN) = c
  // round-to-nearest by the 1.5 * 2^23 trick: SSE2 has no vector round instruction.
  const float fx = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - fx * 0.693359375f) + fx * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x == x ? y * scale : x;
}

// log m = log((1 - beta) exp(lps) + beta exp(lpt)), stable; NaN when either is NaN (std::max / std::min would
// drop a NaN operand).
inline float log_mix(float lps, float lpt, float log1mb, float logb) {
  const float a = lps + log1mb, b = lpt + logb;
  const float hi = std::max(a, b), lo = std::min(a, b);
  const float lm = hi + std::log1p(std::exp(lo - hi));
  return (a == a && b == b) ? lm : a + b;
}

// Generalized-JSD pointwise term at one vocabulary entry: l = beta pt (lpt - lm) + gp, with the student part
// gp = (1 - beta) ps (lps - lm) and lm = log(beta pt + (1 - beta) ps). Returns l; writes gp.
inline float jsd_term(float lps, float lpt, float ps, float pt, float beta, float log1mb, float logb, float& gp) {
  const float lm = log_mix(lps, lpt, log1mb, logb);
  gp = (1.f - beta) * ps * (lps - lm);
  return beta * pt * (lpt - lm) + gp;
}

}  // namespace

ATESD_CLONES
void scale_tile(float* z, int64_t rows, int64_t vt, const float* b, float inv_t) {
  for (int64_t i = 0; i < rows; ++i) {
    float* zi = z + i * vt;
    if (b) {
#pragma omp simd
      for (int64_t j = 0; j < vt; ++j) zi[j] = (zi[j] + b[j]) * inv_t;
    } else {
#pragma omp simd
      for (int64_t j = 0; j < vt; ++j) zi[j] *= inv_t;
    }
  }
}

// Online log-sum-exp update of one row: (m, s, e) over the row's values x[0..vt), and first argmax.
static inline void online_row(const float* x, int64_t vt, int64_t v0, float& m, float& s, float& e, int64_t& idx) {
  float mx = kNegInf;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < vt; ++j) mx = x[j] > mx ? x[j] : mx;
  if (mx > m) {  // strict: on ties the earlier (smaller) vocabulary index wins, as torch.argmax
    int64_t j = 0;
    while (j < vt && x[j] != mx) ++j;
    idx = v0 + j;
    // rescale to the new max: terms (x - m_old) become (x - m_new) = (x - m_old) - d
    if (s > 0.f) {
      const float d = mx - m, sc = fast_exp(-d);
      e = sc * (e - d * s);
      s = sc * s;
    }
    m = mx;
  }
  float ts = 0.f, te = 0.f;
  const float mm = m;
#pragma omp simd reduction(+ : ts, te)
  for (int64_t j = 0; j < vt; ++j) {
    const float u = x[j] - mm;
    const float p = fast_exp(u);
    ts += p;
    te += p * u;
  }
  s += ts;
  e += te;
}

ATESD_CLONES
void pass1_tile(const float* zs, const float* zt, int64_t rows, int64_t vt, int64_t v0, int kind,
                float* ms, float* ss, float* es, int64_t* is, float* mt, float* st, float* et, int64_t* it,
                float* a, float* bound, int64_t ldb, int64_t pitch) {
  const bool fwd = kind == kForward;
  for (int64_t i = 0; i < rows; ++i) {
    const float* xs = zs + i * vt;
    const float* xt = zt + i * vt;
    if (kind == kJSD) {
      online_row(xs, vt, v0, ms[i], ss[i], es[i], is[i]);
      online_row(xt, vt, v0, mt[i], st[i], et[i], it[i]);
      continue;
    }
    // w: the weighting side (teacher for forward KL, student for reverse KL), o: the other one
    const float* w = fwd ? xt : xs;
    const float* o = fwd ? xs : xt;
    float& mo = fwd ? ms[i] : mt[i];
    float& mw = fwd ? mt[i] : ms[i];
    float& sw = fwd ? st[i] : ss[i];
    const float mo_old = mo, mw_old = mw, sw_old = sw;
    online_row(o, vt, v0, mo, fwd ? ss[i] : st[i], fwd ? es[i] : et[i], fwd ? is[i] : it[i]);
    online_row(w, vt, v0, mw, sw, fwd ? et[i] : es[i], fwd ? it[i] : is[i]);
    // a = sum exp(zw - mw) (zo - mo): both sides relative to their own running max, so no term carries the
    // absolute logit level (|z| ~ 1/T); rebased to the new maxima. NaN in sw_old passes through.
    float ai = a[i];
    if (sw_old != 0.f) ai = fast_exp(mw_old - mw) * (ai - (mo - mo_old) * sw_old);
    float ta = 0.f, tc = 0.f, ts = 0.f, umax = kNegInf, wmax = kNegInf;
    const float mwi = mw, moi = mo;
#pragma omp simd reduction(+ : ta, tc, ts) reduction(max : umax, wmax)
    for (int64_t j = 0; j < vt; ++j) {
      const float dw = w[j] - mwi, dor = o[j] - moi, p = fast_exp(dw), u = dw - dor;
      tc += p * dor;
      ta += p * u;
      ts += p;
      umax = u > umax ? u : umax;  // not std::max: its reference form defeats the simd reduction
      wmax = w[j] > wmax ? w[j] : wmax;
    }
    a[i] = ai + tc;
    if (bound) {
      float* b = bound + i * ldb;
      b[0] = wmax;
      b[pitch] = umax;
      b[2 * pitch] = mwi;
      b[3 * pitch] = moi;
      b[4 * pitch] = ta;
      b[5 * pitch] = ts;
    }
  }
}

// The clipped-or-not choice of every pointwise term: c = [not (l > clip)], so a NaN term is kept (not clipped)
// and reaches the loss and g (the contract in _ops.py).
ATESD_CLONES
void pass2_tile(const float* zs, const float* zt, int64_t rows, int64_t vt, int kind, float beta, float clip,
                const float* lse_s, const float* lse_t, float* sum_l, float* sum_clipped, float* sum_gp) {
  const float log1mb = std::log1p(-beta), logb = std::log(beta);
  for (int64_t i = 0; i < rows; ++i) {
    const float* xs = zs + i * vt;
    const float* xt = zt + i * vt;
    const float ls = lse_s[i], lt = lse_t[i];
    float tl = 0.f, tk = 0.f, tg = 0.f;
    if (kind == kForward) {
#pragma omp simd reduction(+ : tl, tk, tg)
      for (int64_t j = 0; j < vt; ++j) {
        const float lpt = xt[j] - lt, lps = xs[j] - ls;
        const float pt = fast_exp(lpt);
        const float l = pt * (lpt - lps);
        const bool over = l > clip;
        tl += l;
        tk += over ? clip : l;
        tg += over ? 0.f : -pt;
      }
    } else if (kind == kReverse) {
#pragma omp simd reduction(+ : tl, tk, tg)
      for (int64_t j = 0; j < vt; ++j) {
        const float lpt = xt[j] - lt, lps = xs[j] - ls;
        const float ps = fast_exp(lps);
        const float l = ps * (lps - lpt);
        const bool over = l > clip;
        tl += l;
        tk += over ? clip : l;
        tg += over ? 0.f : l + ps;
      }
    } else {
      for (int64_t j = 0; j < vt; ++j) {
        const float lpt = xt[j] - lt, lps = xs[j] - ls;
        const float ps = fast_exp(lps), pt = fast_exp(lpt);
        float gp;
        const float l = jsd_term(lps, lpt, ps, pt, beta, log1mb, logb, gp);
        const bool over = l > clip;
        tl += l;
        tk += over ? clip : l;
        tg += over ? 0.f : gp;
      }
    }
    sum_l[i] += tl;
    sum_clipped[i] += tk;
    sum_gp[i] += tg;
  }
}

ATESD_CLONES
void grad_tile(float* zs, const float* zt, int64_t rows, int64_t vt, int kind, float beta, float clip,
               const float* lse_s, const float* lse_t, const float* grad, const float* g, float inv_t) {
  const float log1mb = std::log1p(-beta), logb = std::log(beta);
  for (int64_t i = 0; i < rows; ++i) {
    float* xs = zs + i * vt;
    const float* xt = zt + i * vt;
    const float ls = lse_s[i], lt = lse_t[i];
    const float k = grad[i] * inv_t, gi = g[i];
    if (k == 0.f) {  // masked token: exactly no gradient, whatever its logits hold (NaN included)
      std::fill(xs, xs + vt, 0.f);
      continue;
    }
    if (kind == kForward) {
#pragma omp simd
      for (int64_t j = 0; j < vt; ++j) {
        const float lpt = xt[j] - lt, lps = xs[j] - ls;
        const float pt = fast_exp(lpt), ps = fast_exp(lps);
        const float l = pt * (lpt - lps);
        const float cgp = l > clip ? 0.f : -pt;
        xs[j] = k * (cgp - ps * gi);
      }
    } else if (kind == kReverse) {
#pragma omp simd
      for (int64_t j = 0; j < vt; ++j) {
        const float lpt = xt[j] - lt, lps = xs[j] - ls;
        const float ps = fast_exp(lps);
        const float l = ps * (lps - lpt);
        const float cgp = l > clip ? 0.f : l + ps;
        xs[j] = k * (cgp - ps * gi);
      }
    } else {
      for (int64_t j = 0; j < vt; ++j) {
        const float lpt = xt[j] - lt, lps = xs[j] - ls;
        const float ps = fast_exp(lps), pt = fast_exp(lpt);
        float gp;
        const float l = jsd_term(lps, lpt, ps, pt, beta, log1mb, logb, gp);
        const float cgp = l > clip ? 0.f : gp;
        xs[j] = k * (cgp - ps * gi);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Top-k op: the student's distribution outside the teacher's ids (masked to -inf by the caller).

ATESD_CLONES
void tail_online_tile(const float* z, int64_t rows, int64_t vt, int64_t v0, float* m, float* s, float* e,
                      int64_t* idx) {
  constexpr float kMax = std::numeric_limits<float>::max();
  for (int64_t i = 0; i < rows; ++i) {
    const float* x = z + i * vt;
    float mx = kNegInf;
    int bad = 0;  // unmasked entries that are not finite
#pragma omp simd reduction(max : mx) reduction(+ : bad)
    for (int64_t j = 0; j < vt; ++j) {
      const bool keep = x[j] != kMasked, finite = std::fabs(x[j]) <= kMax;  // NaN: not <=
      mx = keep && finite && x[j] > mx ? x[j] : mx;
      bad += keep && !finite ? 1 : 0;
    }
    if (bad) {
      s[i] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    if (mx > m[i]) {  // strict: on ties the earlier (smaller) vocabulary index wins, as torch.argmax
      int64_t j = 0;
      while (j < vt && x[j] != mx) ++j;
      idx[i] = v0 + j;
      if (s[i] > 0.f) {
        const float d = mx - m[i], sc = fast_exp(-d);
        e[i] = sc * (e[i] - d * s[i]);
        s[i] = sc * s[i];
      }
      m[i] = mx;
    }
    if (m[i] == kNegInf) continue;  // every entry so far masked
    float ts = 0.f, te = 0.f;
    const float mm = m[i];
#pragma omp simd reduction(+ : ts, te)
    for (int64_t j = 0; j < vt; ++j) {
      const bool keep = x[j] != kMasked;
      const float u = x[j] - mm;
      const float p = keep ? fast_exp(u) : 0.f;
      ts += p;
      te += keep ? p * u : 0.f;
    }
    s[i] += ts;
    e[i] += te;
  }
}

ATESD_CLONES
void tail_grad_tile(float* z, int64_t rows, int64_t vt, const float* lse_tail, const float* coef) {
  for (int64_t i = 0; i < rows; ++i) {
    float* x = z + i * vt;
    const float c = coef[i], lt = lse_tail[i];
    if (c == 0.f) {  // no gradient for this row: exactly 0, NaN logits included
      std::fill(x, x + vt, 0.f);
      continue;
    }
#pragma omp simd
    for (int64_t j = 0; j < vt; ++j) {
      const bool keep = x[j] != kMasked;
      const float g = c * fast_exp(x[j] - lt);
      x[j] = keep ? g : 0.f;
    }
  }
}

}  // namespace atesd

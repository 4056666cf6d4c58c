#include "cpu/fast_math.h"

namespace actreplay {

#if defined(__x86_64__) && defined(__GNUC__)
#define ACTREPLAY_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define ACTREPLAY_SIMD_CLONES
#endif

ACTREPLAY_SIMD_CLONES
void sum_exp_shifted(const float* z, int64_t n, float m, float* s_out, float* t_out) {
  float s = 0.f, t = 0.f;
#pragma omp simd reduction(+ : s, t)
  for (int64_t j = 0; j < n; ++j) {
    const float y = z[j] - m;
    // exp underflows to 0 below -87 in float32; say so exactly.
    const float e = y < -87.0f ? 0.0f : exp_nonpositive(y);
    s += e;
    t += y < -87.0f ? 0.0f : e * y;  // a -inf logit (or one past float range) adds nothing, not 0 * -inf
  }
  *s_out = s;
  *t_out = t;
}

ACTREPLAY_SIMD_CLONES
float dot_f32(const float* a, const float* b, int64_t n) {
  // 32 independent partial sums (several vector registers) so consecutive
  // fused multiply-adds do not wait on each other.
  float acc[32] = {0.f};
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
#pragma omp simd
    for (int t = 0; t < 32; ++t) acc[t] += a[j + t] * b[j + t];
  }
  float s = 0.f;
  for (; j < n; ++j) s += a[j] * b[j];
#pragma omp simd reduction(+ : s)
  for (int t = 0; t < 32; ++t) s += acc[t];
  return s;
}

ACTREPLAY_SIMD_CLONES
void axpy_f32(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += alpha * x[j];
}

}  // namespace actreplay

// Small numeric helpers shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace actreplay {

// exp(x) for x <= 0 in float32, to about 1 ulp: Cody-Waite range reduction
// x = n ln2 + r, |r| <= ln2/2, and a degree-7 polynomial for exp(r). Written
// branch-free so the compiler vectorises the loops that call it.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;  // keeps 2^n a normal number; exp(-87) ~ 1.6e-38
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) - n * (-2.12194440e-4f);
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// <a, b> and y += alpha * x over n floats; defined in fast_math.cpp with
// AVX-512/AVX2 clones like sum_exp_shifted.
float dot_f32(const float* a, const float* b, int64_t n);
void axpy_f32(float alpha, const float* x, float* y, int64_t n);

// s = sum_j exp(z_j - m), t = sum_j exp(z_j - m) * (z_j - m), for z_j <= m.
// Defined in fast_math.cpp, compiled for AVX-512, AVX2 and generic x86-64.
void sum_exp_shifted(const float* z, int64_t n, float m, float* s, float* t);

inline void sum_exp_shifted(const double* z, int64_t n, double m, double* s_out, double* t_out) {
  double s = 0, t = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double y = z[j] - m;
    const double e = y < -745.0 ? 0.0 : std::exp(y);
    s += e;
    t += y < -745.0 ? 0.0 : e * y;  // a -inf logit adds nothing, not 0 * -inf
  }
  *s_out = s;
  *t_out = t;
}

}  // namespace actreplay

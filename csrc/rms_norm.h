// The logit lens's RMSNorm as torch operations, shared by the CPU and CUDA
// kernels: on each device it is reference.rms_norm bit for bit (the same ops
// in the same order), so the operators' contract (reference.lens_entropy) can
// be tested without slack for a normalised element that rounds the other way.
#pragma once

#include <ATen/ATen.h>

namespace actreplay {

// h * rsqrt(mean(h^2) + eps) * w in the accumulation dtype, as the SPEC writes
// it; without a weight, just the cast.
inline at::Tensor rms_normalize(const at::Tensor& hidden, const c10::optional<at::Tensor>& weight,
                                double eps, at::ScalarType acc_dtype) {
  at::Tensor x = hidden.to(acc_dtype);
  if (!weight.has_value() || !weight->defined()) return x.contiguous();
  const at::Tensor r = at::rsqrt(x.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return (x * r * weight->to(acc_dtype)).contiguous();
}

}  // namespace actreplay

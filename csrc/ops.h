// Declarations shared by the operator registrations (ops.cpp) and the
// per-device kernels (cpu/*.cpp, cuda/*.cu). Every entry point validates its
// arguments with validate_* (validate.cpp) before it touches memory, so a bad
// call fails with a message that names the argument, on any device.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

namespace actreplay {

// ---- argument validation (device independent, validate.cpp) -------------
void validate_lens_entropy(const at::Tensor& hidden, const at::Tensor& unembed,
                           const c10::optional<at::Tensor>& norm_weight,
                           double eps, int64_t topk);
void validate_topk_logp(const at::Tensor& hidden, const at::Tensor& unembed,
                        const c10::optional<at::Tensor>& norm_weight, double eps,
                        const at::Tensor& target_idx, const char* op);
void validate_topk_kl(const at::Tensor& hidden, const at::Tensor& unembed,
                      const c10::optional<at::Tensor>& norm_weight, double eps,
                      const at::Tensor& target_idx, const at::Tensor& target_logp);
void validate_replay_scatter(const at::Tensor& hidden, const at::Tensor& positions,
                             const at::Tensor& values, const std::string& mode);
void validate_select_tokens(const at::Tensor& entropy, const at::Tensor& candidates,
                            const std::string& rule, const std::vector<double>& value,
                            const std::string& side);
// topk_kl's checks that read no data (shapes, dtypes, devices, contiguity):
// what topk_kl_backward_logq runs, whose kernel checks the index range itself.
void check_topk_kl_shapes(const at::Tensor& hidden, const at::Tensor& unembed,
                          const c10::optional<at::Tensor>& norm_weight, double eps,
                          const at::Tensor& target_idx, const at::Tensor& target_logp,
                          const char* op);
// Index range checks read the indices, so they run where the indices live
// (a device->host copy of M or M*k int64 on CUDA: small next to the kernels).
void check_index_range(const at::Tensor& idx, int64_t upper, const char* op,
                       const char* arg, const char* bound_name);

// Output dtype for the float results: float64 inputs give float64 results so
// gradcheck can run in double; every other dtype gives float32.
inline at::ScalarType result_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- CPU kernels ---------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lens_entropy_cpu(
    const at::Tensor& hidden, const at::Tensor& unembed,
    const c10::optional<at::Tensor>& norm_weight, double eps, int64_t topk);
at::Tensor select_tokens_cpu(const at::Tensor& entropy, const at::Tensor& candidates,
                             const std::string& rule, at::ArrayRef<double> value,
                             const std::string& side);
at::Tensor replay_scatter_cpu(const at::Tensor& hidden, const at::Tensor& positions,
                              const at::Tensor& values, const std::string& mode);
at::Tensor topk_logp_cpu(const at::Tensor& hidden, const at::Tensor& unembed,
                         const c10::optional<at::Tensor>& norm_weight, double eps,
                         const at::Tensor& target_idx);
at::Tensor topk_kl_cpu(const at::Tensor& hidden, const at::Tensor& unembed,
                       const c10::optional<at::Tensor>& norm_weight, double eps,
                       const at::Tensor& target_idx, const at::Tensor& target_logp);
at::Tensor topk_kl_backward_cpu(const at::Tensor& grad_kl, const at::Tensor& hidden,
                                const at::Tensor& unembed,
                                const c10::optional<at::Tensor>& norm_weight, double eps,
                                const at::Tensor& target_idx,
                                const at::Tensor& target_logp);
// topk_kl that also returns log q [M, k], and the backward that reads it.
std::tuple<at::Tensor, at::Tensor> topk_kl_logq_cpu(const at::Tensor& hidden, const at::Tensor& unembed,
                                                    const c10::optional<at::Tensor>& norm_weight,
                                                    double eps, const at::Tensor& target_idx,
                                                    const at::Tensor& target_logp);
at::Tensor topk_kl_backward_logq_cpu(const at::Tensor& grad_kl, const at::Tensor& hidden,
                                     const at::Tensor& unembed,
                                     const c10::optional<at::Tensor>& norm_weight, double eps,
                                     const at::Tensor& target_idx, const at::Tensor& target_logp,
                                     const at::Tensor& logq);

#ifdef ACTREPLAY_WITH_CUDA
// ---- CUDA kernels --------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lens_entropy_cuda(
    const at::Tensor& hidden, const at::Tensor& unembed,
    const c10::optional<at::Tensor>& norm_weight, double eps, int64_t topk);
at::Tensor select_tokens_cuda(const at::Tensor& entropy, const at::Tensor& candidates,
                              const std::string& rule, at::ArrayRef<double> value,
                              const std::string& side);
at::Tensor replay_scatter_cuda(const at::Tensor& hidden, const at::Tensor& positions,
                               const at::Tensor& values, const std::string& mode);
at::Tensor topk_logp_cuda(const at::Tensor& hidden, const at::Tensor& unembed,
                          const c10::optional<at::Tensor>& norm_weight, double eps,
                          const at::Tensor& target_idx);
at::Tensor topk_kl_cuda(const at::Tensor& hidden, const at::Tensor& unembed,
                        const c10::optional<at::Tensor>& norm_weight, double eps,
                        const at::Tensor& target_idx, const at::Tensor& target_logp);
at::Tensor topk_kl_backward_cuda(const at::Tensor& grad_kl, const at::Tensor& hidden,
                                 const at::Tensor& unembed,
                                 const c10::optional<at::Tensor>& norm_weight, double eps,
                                 const at::Tensor& target_idx,
                                 const at::Tensor& target_logp);
std::tuple<at::Tensor, at::Tensor> topk_kl_logq_cuda(const at::Tensor& hidden, const at::Tensor& unembed,
                                                     const c10::optional<at::Tensor>& norm_weight,
                                                     double eps, const at::Tensor& target_idx,
                                                     const at::Tensor& target_logp);
at::Tensor topk_kl_backward_logq_cuda(const at::Tensor& grad_kl, const at::Tensor& hidden,
                                      const at::Tensor& unembed,
                                      const c10::optional<at::Tensor>& norm_weight, double eps,
                                      const at::Tensor& target_idx, const at::Tensor& target_logp,
                                      const at::Tensor& logq);
#endif

}  // namespace actreplay

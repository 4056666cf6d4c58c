// Operator schemas (namespace `actreplay`) and their CPU/CUDA registrations.
// Autograd and fake (meta) implementations live in Python (actreplay_ext/ops.py);
// the Python module itself is python_module.cpp.
#include <torch/library.h>

#include "ops.h"


namespace actreplay {
namespace {

// One entry per op for both dispatch keys: validate, then run the kernel of
// the tensors' device.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lens_entropy(
    const at::Tensor& hidden, const at::Tensor& unembed,
    const c10::optional<at::Tensor>& norm_weight, double eps, int64_t topk) {
  validate_lens_entropy(hidden, unembed, norm_weight, eps, topk);
#ifdef ACTREPLAY_WITH_CUDA
  if (hidden.is_cuda()) return lens_entropy_cuda(hidden, unembed, norm_weight, eps, topk);
#endif
  return lens_entropy_cpu(hidden, unembed, norm_weight, eps, topk);
}

at::Tensor select_tokens(const at::Tensor& entropy, const at::Tensor& candidates,
                         c10::string_view rule, at::ArrayRef<double> value,
                         c10::string_view side) {
  const std::string rule_s(rule), side_s(side);
  validate_select_tokens(entropy, candidates, rule_s, value.vec(), side_s);
#ifdef ACTREPLAY_WITH_CUDA
  if (entropy.is_cuda()) return select_tokens_cuda(entropy, candidates, rule_s, value, side_s);
#endif
  return select_tokens_cpu(entropy, candidates, rule_s, value, side_s);
}

at::Tensor replay_scatter(const at::Tensor& hidden, const at::Tensor& positions,
                          const at::Tensor& values, c10::string_view mode) {
  const std::string mode_s(mode);
  validate_replay_scatter(hidden, positions, values, mode_s);
#ifdef ACTREPLAY_WITH_CUDA
  if (hidden.is_cuda()) return replay_scatter_cuda(hidden, positions, values, mode_s);
#endif
  return replay_scatter_cpu(hidden, positions, values, mode_s);
}

at::Tensor topk_kl(const at::Tensor& hidden, const at::Tensor& unembed,
                   const c10::optional<at::Tensor>& norm_weight, double eps,
                   const at::Tensor& target_idx, const at::Tensor& target_logp) {
  validate_topk_kl(hidden, unembed, norm_weight, eps, target_idx, target_logp);
#ifdef ACTREPLAY_WITH_CUDA
  if (hidden.is_cuda())
    return topk_kl_cuda(hidden, unembed, norm_weight, eps, target_idx, target_logp);
#endif
  return topk_kl_cpu(hidden, unembed, norm_weight, eps, target_idx, target_logp);
}

at::Tensor topk_logp(const at::Tensor& hidden, const at::Tensor& unembed,
                     const c10::optional<at::Tensor>& norm_weight, double eps,
                     const at::Tensor& target_idx) {
  validate_topk_logp(hidden, unembed, norm_weight, eps, target_idx, "topk_logp");
#ifdef ACTREPLAY_WITH_CUDA
  if (hidden.is_cuda()) return topk_logp_cuda(hidden, unembed, norm_weight, eps, target_idx);
#endif
  return topk_logp_cpu(hidden, unembed, norm_weight, eps, target_idx);
}

at::Tensor topk_kl_backward(const at::Tensor& grad_kl, const at::Tensor& hidden,
                            const at::Tensor& unembed,
                            const c10::optional<at::Tensor>& norm_weight, double eps,
                            const at::Tensor& target_idx, const at::Tensor& target_logp) {
  validate_topk_kl(hidden, unembed, norm_weight, eps, target_idx, target_logp);
  TORCH_CHECK_VALUE(grad_kl.dim() == 1 && grad_kl.size(0) == hidden.size(0),
                    "actreplay.topk_kl_backward: argument 'grad_kl' must be [M] with M = ",
                    hidden.size(0), ", got shape ", grad_kl.sizes());
  TORCH_CHECK_VALUE(grad_kl.device() == hidden.device(),
                    "actreplay.topk_kl_backward: argument 'grad_kl' must be on ",
                    hidden.device(), ", got ", grad_kl.device());
  const auto grad = grad_kl.to(result_dtype(hidden)).contiguous();
#ifdef ACTREPLAY_WITH_CUDA
  if (hidden.is_cuda())
    return topk_kl_backward_cuda(grad, hidden, unembed, norm_weight, eps, target_idx,
                                 target_logp);
#endif
  return topk_kl_backward_cpu(grad, hidden, unembed, norm_weight, eps, target_idx,
                              target_logp);
}

// The autograd path of ops.topk_kl: the forward keeps log q, and the backward
// reads it instead of recomputing the k dot products per row. The backward's
// inputs are normally the forward's, validated there, but the op is public:
// it checks every shape, dtype and device again (no pass over the data, no
// host sync), and its kernel refuses indices outside [0, V) as it reads them.
std::tuple<at::Tensor, at::Tensor> topk_kl_logq(const at::Tensor& hidden, const at::Tensor& unembed,
                                                const c10::optional<at::Tensor>& norm_weight,
                                                double eps, const at::Tensor& target_idx,
                                                const at::Tensor& target_logp) {
  validate_topk_kl(hidden, unembed, norm_weight, eps, target_idx, target_logp);
#ifdef ACTREPLAY_WITH_CUDA
  if (hidden.is_cuda())
    return topk_kl_logq_cuda(hidden, unembed, norm_weight, eps, target_idx, target_logp);
#endif
  return topk_kl_logq_cpu(hidden, unembed, norm_weight, eps, target_idx, target_logp);
}

at::Tensor topk_kl_backward_logq(const at::Tensor& grad_kl, const at::Tensor& hidden,
                                 const at::Tensor& unembed,
                                 const c10::optional<at::Tensor>& norm_weight, double eps,
                                 const at::Tensor& target_idx, const at::Tensor& target_logp,
                                 const at::Tensor& logq) {
  check_topk_kl_shapes(hidden, unembed, norm_weight, eps, target_idx, target_logp,
                       "topk_kl_backward_logq");
  TORCH_CHECK_VALUE(grad_kl.dim() == 1 && grad_kl.size(0) == hidden.size(0),
                    "actreplay.topk_kl_backward_logq: argument 'grad_kl' must be [M] with M = ",
                    hidden.size(0), ", got shape ", grad_kl.sizes());
  TORCH_CHECK_VALUE(logq.sizes() == target_idx.sizes() && logq.scalar_type() == result_dtype(hidden) &&
                        logq.is_contiguous(),
                    "actreplay.topk_kl_backward_logq: argument 'logq' must be the contiguous ",
                    result_dtype(hidden), " ", target_idx.sizes(), " log q of topk_kl_logq, got ",
                    logq.scalar_type(), " ", logq.sizes());
  TORCH_CHECK_VALUE(grad_kl.device() == hidden.device() && logq.device() == hidden.device(),
                    "actreplay.topk_kl_backward_logq: arguments 'grad_kl' and 'logq' must be on ",
                    hidden.device(), ", got ", grad_kl.device(), " and ", logq.device());
  const auto grad = grad_kl.to(result_dtype(hidden)).contiguous();
#ifdef ACTREPLAY_WITH_CUDA
  if (hidden.is_cuda())
    return topk_kl_backward_logq_cuda(grad, hidden, unembed, norm_weight, eps, target_idx,
                                      target_logp, logq);
#endif
  return topk_kl_backward_logq_cpu(grad, hidden, unembed, norm_weight, eps, target_idx, target_logp,
                                   logq);
}

}  // namespace

TORCH_LIBRARY(actreplay, m) {
  m.def(
      "lens_entropy(Tensor hidden, Tensor unembed, Tensor? norm_weight, float eps, "
      "int topk=0) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "select_tokens(Tensor entropy, Tensor candidates, str rule, float[] value, str side) "
      "-> Tensor");
  m.def("replay_scatter(Tensor hidden, Tensor positions, Tensor values, str mode) -> Tensor");
  m.def(
      "topk_kl(Tensor hidden, Tensor unembed, Tensor? norm_weight, float eps, "
      "Tensor target_idx, Tensor target_logp) -> Tensor");
  m.def(
      "topk_logp(Tensor hidden, Tensor unembed, Tensor? norm_weight, float eps, "
      "Tensor target_idx) -> Tensor");
  m.def(
      "topk_kl_backward(Tensor grad_kl, Tensor hidden, Tensor unembed, Tensor? norm_weight, "
      "float eps, Tensor target_idx, Tensor target_logp) -> Tensor");
  m.def(
      "topk_kl_logq(Tensor hidden, Tensor unembed, Tensor? norm_weight, float eps, "
      "Tensor target_idx, Tensor target_logp) -> (Tensor, Tensor)");
  m.def(
      "topk_kl_backward_logq(Tensor grad_kl, Tensor hidden, Tensor unembed, Tensor? norm_weight, "
      "float eps, Tensor target_idx, Tensor target_logp, Tensor logq) -> Tensor");
}

TORCH_LIBRARY_IMPL(actreplay, CPU, m) {
  m.impl("lens_entropy", &lens_entropy);
  m.impl("select_tokens", &select_tokens);
  m.impl("replay_scatter", &replay_scatter);
  m.impl("topk_kl", &topk_kl);
  m.impl("topk_logp", &topk_logp);
  m.impl("topk_kl_backward", &topk_kl_backward);
  m.impl("topk_kl_logq", &topk_kl_logq);
  m.impl("topk_kl_backward_logq", &topk_kl_backward_logq);
}

#ifdef ACTREPLAY_WITH_CUDA
TORCH_LIBRARY_IMPL(actreplay, CUDA, m) {
  m.impl("lens_entropy", &lens_entropy);
  m.impl("select_tokens", &select_tokens);
  m.impl("replay_scatter", &replay_scatter);
  m.impl("topk_kl", &topk_kl);
  m.impl("topk_logp", &topk_logp);
  m.impl("topk_kl_backward", &topk_kl_backward);
  m.impl("topk_kl_logq", &topk_kl_logq);
  m.impl("topk_kl_backward_logq", &topk_kl_backward_logq);
}
#endif

}  // namespace actreplay

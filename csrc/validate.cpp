// Argument validation for the four operators. Runs before any kernel on any
// device so that misuse fails with a message naming the argument and what was
// expected, never deep inside a kernel.
#include "ops.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace actreplay {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

void check_tensor(const char* op, const char* arg, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.defined(), "actreplay.", op, ": argument '", arg, "' is undefined");
  TORCH_CHECK_VALUE(t.dim() == dim, "actreplay.", op, ": argument '", arg, "' must be ", dim,
                    "-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "actreplay.", op, ": argument '", arg,
                    "' must be contiguous (call .contiguous()), got strides ", t.strides());
  TORCH_CHECK_VALUE(t.device().is_cpu() || t.device().is_cuda(), "actreplay.", op,
                    ": argument '", arg, "' must be a CPU or CUDA tensor, got ", t.device());
}

void check_float(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), "actreplay.", op, ": argument '", arg,
                   "' must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
}

void check_same(const char* op, const char* arg, const at::Tensor& t, const char* ref_name,
                const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "actreplay.", op, ": argument '", arg,
                   "' must have the dtype of '", ref_name, "' (", ref.scalar_type(), "), got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), "actreplay.", op, ": argument '", arg,
                    "' must be on the device of '", ref_name, "' (", ref.device(), "), got ",
                    t.device());
}

void check_device(const char* op, const char* arg, const at::Tensor& t, const char* ref_name,
                  const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "actreplay.", op, ": argument '", arg,
                    "' must be on the device of '", ref_name, "' (", ref.device(), "), got ",
                    t.device());
}

void check_device_compiled(const char* op, const at::Tensor& t) {
#ifndef ACTREPLAY_WITH_CUDA
  TORCH_CHECK(!t.is_cuda(), "actreplay.", op,
              ": got CUDA tensors but actreplay_ext was built without CUDA kernels "
              "(see actreplay_ext.build_info(); reinstall with a CUDA toolkit present)");
#else
  (void)op;
  (void)t;
#endif
}

// The logit-lens arguments shared by lens_entropy and topk_kl.
void check_lens(const char* op, const at::Tensor& hidden, const at::Tensor& unembed,
                const c10::optional<at::Tensor>& norm_weight, double eps) {
  check_tensor(op, "hidden", hidden, 2);
  check_float(op, "hidden", hidden);
  check_device_compiled(op, hidden);
  check_tensor(op, "unembed", unembed, 2);
  check_same(op, "unembed", unembed, "hidden", hidden);
  TORCH_CHECK_VALUE(hidden.size(1) >= 1, "actreplay.", op,
                    ": argument 'hidden' must have a hidden size D >= 1, got shape ",
                    hidden.sizes());
  TORCH_CHECK_VALUE(unembed.size(1) == hidden.size(1), "actreplay.", op,
                    ": argument 'unembed' must be [V, D] with D = hidden.size(1) = ",
                    hidden.size(1), ", got shape ", unembed.sizes());
  TORCH_CHECK_VALUE(unembed.size(0) >= 1, "actreplay.", op,
                    ": argument 'unembed' must have at least one vocabulary row, got shape ",
                    unembed.sizes());
  if (norm_weight.has_value() && norm_weight->defined()) {
    check_tensor(op, "norm_weight", *norm_weight, 1);
    check_same(op, "norm_weight", *norm_weight, "hidden", hidden);
    TORCH_CHECK_VALUE(norm_weight->size(0) == hidden.size(1), "actreplay.", op,
                      ": argument 'norm_weight' must be [D] with D = hidden.size(1) = ",
                      hidden.size(1), ", got shape ", norm_weight->sizes());
  }
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "actreplay.", op,
                    ": argument 'eps' must be finite and >= 0, got ", eps);
}

}  // namespace

void check_index_range(const at::Tensor& idx, int64_t upper, const char* op, const char* arg,
                       const char* bound_name) {
  if (idx.numel() == 0) return;
  // one reduction and one host sync for both bounds
  const auto minmax = at::aminmax(idx);
  const auto bounds = at::stack({std::get<0>(minmax), std::get<1>(minmax)}).cpu();
  const auto lo = bounds[0].item<int64_t>();
  const auto hi = bounds[1].item<int64_t>();
  TORCH_CHECK_INDEX(lo >= 0 && hi < upper, "actreplay.", op, ": argument '", arg,
                    "' must hold indices in [0, ", bound_name, " = ", upper, "), got values in [",
                    lo, ", ", hi, "]");
}

void validate_lens_entropy(const at::Tensor& hidden, const at::Tensor& unembed,
                           const c10::optional<at::Tensor>& norm_weight, double eps,
                           int64_t topk) {
  check_lens("lens_entropy", hidden, unembed, norm_weight, eps);
  const int64_t V = unembed.size(0);
  TORCH_CHECK_VALUE(topk >= 0 && topk <= V,
                    "actreplay.lens_entropy: argument 'topk' must be in [0, V] where V = "
                    "unembed.size(0) = ",
                    V, ", got topk = ", topk);
}

// Shapes, dtypes, devices and contiguity of topk_logp's arguments: O(1), no
// pass over the indices.
void check_topk_shapes(const at::Tensor& hidden, const at::Tensor& unembed,
                       const c10::optional<at::Tensor>& norm_weight, double eps,
                       const at::Tensor& target_idx, const char* op) {
  check_lens(op, hidden, unembed, norm_weight, eps);
  check_tensor(op, "target_idx", target_idx, 2);
  TORCH_CHECK_TYPE(target_idx.scalar_type() == at::kLong, "actreplay.", op,
                   ": argument 'target_idx' must be int64, got ", target_idx.scalar_type());
  check_device(op, "target_idx", target_idx, "hidden", hidden);
  TORCH_CHECK_VALUE(target_idx.size(0) == hidden.size(0), "actreplay.", op,
                    ": argument 'target_idx' must be [M, k] with M = hidden.size(0) = ",
                    hidden.size(0), ", got shape ", target_idx.sizes());
  TORCH_CHECK_VALUE(target_idx.size(1) >= 1, "actreplay.", op,
                    ": argument 'target_idx' must have k >= 1 columns, got shape ",
                    target_idx.sizes());
}

void validate_topk_logp(const at::Tensor& hidden, const at::Tensor& unembed,
                        const c10::optional<at::Tensor>& norm_weight, double eps,
                        const at::Tensor& target_idx, const char* op) {
  check_topk_shapes(hidden, unembed, norm_weight, eps, target_idx, op);
  check_index_range(target_idx, unembed.size(0), op, "target_idx", "V");
}

void check_topk_kl_shapes(const at::Tensor& hidden, const at::Tensor& unembed,
                          const c10::optional<at::Tensor>& norm_weight, double eps,
                          const at::Tensor& target_idx, const at::Tensor& target_logp,
                          const char* op) {
  check_topk_shapes(hidden, unembed, norm_weight, eps, target_idx, op);
  check_tensor(op, "target_logp", target_logp, 2);
  TORCH_CHECK_TYPE(
      target_logp.scalar_type() == at::kFloat || target_logp.scalar_type() == at::kDouble,
      "actreplay.", op, ": argument 'target_logp' must be float32 or float64, got ",
      target_logp.scalar_type());
  check_device(op, "target_logp", target_logp, "hidden", hidden);
  TORCH_CHECK_VALUE(target_logp.sizes() == target_idx.sizes(),
                    "actreplay.", op, ": argument 'target_logp' must have the shape of "
                    "'target_idx' ",
                    target_idx.sizes(), ", got ", target_logp.sizes());
}

void validate_topk_kl(const at::Tensor& hidden, const at::Tensor& unembed,
                      const c10::optional<at::Tensor>& norm_weight, double eps,
                      const at::Tensor& target_idx, const at::Tensor& target_logp) {
  check_topk_kl_shapes(hidden, unembed, norm_weight, eps, target_idx, target_logp, "topk_kl");
  check_index_range(target_idx, unembed.size(0), "topk_kl", "target_idx", "V");
  if (target_logp.numel() > 0) {
    // -inf (probability 0) is allowed; NaN and +inf are not probabilities.
    const bool bad = at::logical_or(at::isnan(target_logp), at::isposinf(target_logp))
                         .any()
                         .item<bool>();
    TORCH_CHECK_VALUE(!bad,
                      "actreplay.topk_kl: argument 'target_logp' must hold log-probabilities "
                      "(finite or -inf), found NaN or +inf");
  }
}

void validate_replay_scatter(const at::Tensor& hidden, const at::Tensor& positions,
                             const at::Tensor& values, const std::string& mode) {
  const char* op = "replay_scatter";
  check_tensor(op, "hidden", hidden, 2);
  check_float(op, "hidden", hidden);
  check_device_compiled(op, hidden);
  check_tensor(op, "positions", positions, 1);
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kLong,
                   "actreplay.replay_scatter: argument 'positions' must be int64, got ",
                   positions.scalar_type());
  check_device(op, "positions", positions, "hidden", hidden);
  check_tensor(op, "values", values, 2);
  check_same(op, "values", values, "hidden", hidden);
  TORCH_CHECK_VALUE(values.size(0) == positions.size(0),
                    "actreplay.replay_scatter: arguments 'positions' and 'values' must have "
                    "the same length M, got positions of length ",
                    positions.size(0), " and values of shape ", values.sizes());
  TORCH_CHECK_VALUE(values.size(1) == hidden.size(1),
                    "actreplay.replay_scatter: argument 'values' must be [M, D] with D = "
                    "hidden.size(1) = ",
                    hidden.size(1), ", got shape ", values.sizes());
  TORCH_CHECK_VALUE(mode == "add" || mode == "replace",
                    "actreplay.replay_scatter: argument 'mode' must be 'add' or 'replace', got '",
                    mode, "'");
  check_index_range(positions, hidden.size(0), op, "positions", "T");
  if (mode == "replace" && positions.numel() > 1) {
    // Two values for one position would make the result depend on write order.
    const auto sorted = std::get<0>(positions.sort());
    const bool dup = sorted.slice(0, 1).eq(sorted.slice(0, 0, -1)).any().item<bool>();
    TORCH_CHECK_VALUE(!dup,
                      "actreplay.replay_scatter: argument 'positions' must be unique for "
                      "mode='replace' (duplicates are only allowed with mode='add')");
  }
}

void validate_select_tokens(const at::Tensor& entropy, const at::Tensor& candidates,
                            const std::string& rule, const std::vector<double>& value,
                            const std::string& side) {
  const char* op = "select_tokens";
  check_tensor(op, "entropy", entropy, 2);
  TORCH_CHECK_TYPE(entropy.scalar_type() == at::kFloat || entropy.scalar_type() == at::kDouble,
                   "actreplay.select_tokens: argument 'entropy' must be float32 or float64, got ",
                   entropy.scalar_type());
  check_device_compiled(op, entropy);
  check_tensor(op, "candidates", candidates, 1);
  TORCH_CHECK_TYPE(candidates.scalar_type() == at::kBool,
                   "actreplay.select_tokens: argument 'candidates' must be bool, got ",
                   candidates.scalar_type());
  check_device(op, "candidates", candidates, "entropy", entropy);
  TORCH_CHECK_VALUE(candidates.size(0) == entropy.size(1),
                    "actreplay.select_tokens: argument 'candidates' must be [N] with N = "
                    "entropy.size(1) = ",
                    entropy.size(1), ", got shape ", candidates.sizes());
  TORCH_CHECK_VALUE(rule == "ratio" || rule == "topk" || rule == "absolute",
                    "actreplay.select_tokens: argument 'rule' must be one of 'ratio', 'topk', "
                    "'absolute', got '",
                    rule, "'");
  TORCH_CHECK_VALUE(side == "low" || side == "high",
                    "actreplay.select_tokens: argument 'side' must be 'low' or 'high', got '",
                    side, "'");
  const int64_t L = entropy.size(0);
  TORCH_CHECK_VALUE(
      value.size() == 1 || static_cast<int64_t>(value.size()) == L,
      "actreplay.select_tokens: argument 'value' must hold 1 value or one per layer (L = "
      "entropy.size(0) = ",
      L, "), got ", value.size());
  for (double v : value) {
    if (rule == "ratio") {
      TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0,
                        "actreplay.select_tokens: argument 'value' must be a finite ratio >= 0 "
                        "for rule='ratio', got ",
                        v);
    } else if (rule == "topk") {
      TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0 && (v < 1 || v == std::floor(v)),
                        "actreplay.select_tokens: argument 'value' must be a count (an integer "
                        ">= 1) or a fraction in [0, 1) for rule='topk', got ",
                        v);
    } else {
      TORCH_CHECK_VALUE(!std::isnan(v),
                        "actreplay.select_tokens: argument 'value' must be a threshold, got NaN");
    }
  }
  if (entropy.numel() > 0) {
    const bool nan = at::logical_and(at::isnan(entropy), candidates.unsqueeze(0))
                         .any()
                         .item<bool>();
    TORCH_CHECK_VALUE(!nan,
                      "actreplay.select_tokens: argument 'entropy' holds NaN at a candidate "
                      "position");
  }
}

}  // namespace actreplay

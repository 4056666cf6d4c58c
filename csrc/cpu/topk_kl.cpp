// CPU gathered top-k KL: KL(p || softmax(z[target_idx])) per row, where z is the
// logit lens of the row, computed from the k gathered unembedding rows only
// ([M, k] dot products instead of [M, V]). Forward and its backward w.r.t.
// `hidden` (through the RMSNorm). Rows run in parallel (at::parallel_for).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/fast_math.h"
#include "rms_norm.h"
#include "ops.h"

namespace actreplay {
namespace {

// A row of the unembedding in the accumulation type: float rows are used in
// place, half/bf16 rows are widened into `buf`.
template <typename scalar_t, typename acc_t>
const acc_t* widen(const scalar_t* w, int64_t D, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return w;
  } else {
    for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<acc_t>(w[d]);
    return buf;
  }
}

template <typename acc_t>
acc_t dot(const acc_t* x, const acc_t* w, int64_t D) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return dot_f32(x, w, D);
  } else {
    acc_t s = 0;
    for (int64_t d = 0; d < D; ++d) s += x[d] * w[d];
    return s;
  }
}

template <typename acc_t>
void axpy(acc_t alpha, const acc_t* x, acc_t* y, int64_t D) {
  if constexpr (std::is_same_v<acc_t, float>) {
    axpy_f32(alpha, x, y, D);
  } else {
    for (int64_t d = 0; d < D; ++d) y[d] += alpha * x[d];
  }
}

// Ask for the next gathered unembedding row while the current one is used:
// the rows are scattered over the whole matrix, so each one starts a DRAM miss.
template <typename scalar_t>
void prefetch_row(const scalar_t* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(scalar_t)); b += 64) __builtin_prefetch(p + b);
}

// For one row: z = log q (row_logq), returning the row's KL. `pr` receives
// p_j = exp(target_logp_j).
// z_j = log q_j = log_softmax(<xn, U[idx_j]>)_j for one row. The one place log q is
// computed: topk_logp (the targets), the KL and its backward all read it from
// here, so a model replayed against an exact copy of itself has KL exactly 0
// and a gradient exactly 0. With `keep` (k x D), the gathered rows are also
// kept there in the accumulation type, so that the backward reads them from
// cache rather than from the matrix again.
template <typename scalar_t, typename acc_t>
void row_logq(const acc_t* xn, const scalar_t* U, int64_t D, const int64_t* idx, int64_t k,
              acc_t* z, acc_t* buf, acc_t* keep = nullptr) {
  acc_t zmax = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < k; ++j) {
    if (j + 1 < k) prefetch_row(U + idx[j + 1] * D, D);
    const acc_t* u = widen<scalar_t, acc_t>(U + idx[j] * D, D, keep ? keep + j * D : buf);
    if (keep && u != keep + j * D) std::copy(u, u + D, keep + j * D);
    z[j] = dot<acc_t>(xn, u, D);
    zmax = std::max(zmax, z[j]);
  }
  acc_t se = 0;
  for (int64_t j = 0; j < k; ++j) se += std::exp(z[j] - zmax);
  const acc_t lse = zmax + std::log(se);
  for (int64_t j = 0; j < k; ++j) z[j] -= lse;
}

template <typename scalar_t, typename acc_t, typename logp_t>
acc_t row_kl(const acc_t* xn, const scalar_t* U, int64_t D, const int64_t* idx,
             const logp_t* lp, int64_t k, acc_t* z, acc_t* pr, acc_t* buf, acc_t* keep = nullptr) {
  row_logq<scalar_t, acc_t>(xn, U, D, idx, k, z, buf, keep);
  acc_t kl = 0;
  for (int64_t j = 0; j < k; ++j) {
    const acc_t l = static_cast<acc_t>(lp[j]);
    pr[j] = std::exp(l);
    if (pr[j] > 0) kl += pr[j] * (l - z[j]);  // p = 0 contributes exactly 0
  }
  return kl;
}

// d kl / d h from d kl / d xn (`gx`) through the lens RMSNorm, written to `out`.
// xn = h * r * w with r = (mean(h^2) + eps)^-1/2: dh = r * u - r^3 * h * <u, h> / D,
// where u = gx * w. Without a norm weight (W null), dh = gx.
template <typename scalar_t, typename acc_t>
void norm_backward(const acc_t* gx, const acc_t* hr, const acc_t* W, int64_t D, double eps,
                   scalar_t* out) {
  if (W == nullptr) {
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(gx[d]);
    return;
  }
  acc_t ss = 0, uh = 0;
  for (int64_t d = 0; d < D; ++d) {
    ss += hr[d] * hr[d];
    uh += gx[d] * W[d] * hr[d];
  }
  const acc_t r = acc_t(1) / std::sqrt(ss / D + static_cast<acc_t>(eps));
  const acc_t c = r * r * r * uh / D;
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(r * gx[d] * W[d] - c * hr[d]);
}

template <typename scalar_t>
using acc_type_ptr = at::opmath_type<scalar_t>*;

template <typename scalar_t, typename logp_t>
void topk_kl_forward_kernel(const at::Tensor& hidden, const at::Tensor& unembed,
                            const c10::optional<at::Tensor>& norm_weight, double eps,
                            const at::Tensor& target_idx, const at::Tensor& target_logp,
                            at::Tensor& out, acc_type_ptr<scalar_t> logq = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = hidden.size(0), D = hidden.size(1), k = target_idx.size(1);
  const at::Tensor xn = rms_normalize(hidden, norm_weight, eps,
                                      c10::CppTypeToScalarType<acc_t>::value);
  const acc_t* X = xn.data_ptr<acc_t>();
  const scalar_t* U = unembed.data_ptr<scalar_t>();
  const int64_t* I = target_idx.data_ptr<int64_t>();
  const logp_t* LP = target_logp.data_ptr<logp_t>();
  acc_t* O = out.data_ptr<acc_t>();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    std::vector<acc_t> z(k), pr(k), buf(D);
    for (int64_t i = b; i < e; ++i) {
      acc_t* zi = logq ? logq + i * k : z.data();  // with `logq`, log q stays for the backward
      O[i] = row_kl<scalar_t, acc_t, logp_t>(X + i * D, U, D, I + i * k, LP + i * k, k, zi,
                                             pr.data(), buf.data());
    }
  });
}

template <typename scalar_t, typename logp_t>
void topk_kl_backward_kernel(const at::Tensor& grad_kl, const at::Tensor& hidden,
                             const at::Tensor& unembed,
                             const c10::optional<at::Tensor>& norm_weight, double eps,
                             const at::Tensor& target_idx, const at::Tensor& target_logp,
                             at::Tensor& grad_hidden) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = hidden.size(0), D = hidden.size(1), k = target_idx.size(1);
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const bool has_norm = norm_weight.has_value() && norm_weight->defined();
  const at::Tensor h = hidden.to(acc_dtype).contiguous();
  const at::Tensor w = has_norm ? norm_weight->to(acc_dtype).contiguous() : at::Tensor();
  const at::Tensor xn = rms_normalize(hidden, norm_weight, eps, acc_dtype);
  const acc_t* H = h.data_ptr<acc_t>();
  const acc_t* W = has_norm ? w.data_ptr<acc_t>() : nullptr;
  const acc_t* X = xn.data_ptr<acc_t>();
  const scalar_t* U = unembed.data_ptr<scalar_t>();
  const int64_t* I = target_idx.data_ptr<int64_t>();
  const logp_t* LP = target_logp.data_ptr<logp_t>();
  const acc_t* G = grad_kl.data_ptr<acc_t>();
  scalar_t* GH = grad_hidden.data_ptr<scalar_t>();

  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    std::vector<acc_t> z(k), pr(k), gx(D), buf(D), rows(k * D);
    for (int64_t i = b; i < e; ++i) {
      const int64_t* idx = I + i * k;
      row_kl<scalar_t, acc_t, logp_t>(X + i * D, U, D, idx, LP + i * k, k, z.data(), pr.data(),
                                      buf.data(), rows.data());
      // d kl / d z_j = q_j - p_j for targets p that sum to 1 (z now holds log q);
      // exactly 0 where the targets are this row's own log q (topk_logp).
      std::fill(gx.begin(), gx.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const acc_t gz = G[i] * (std::exp(z[j]) - pr[j]);
        axpy<acc_t>(gz, rows.data() + j * D, gx.data(), D);
      }
      norm_backward<scalar_t, acc_t>(gx.data(), H + i * D, W, D, eps, GH + i * D);
    }
  });
}

// The backward from the forward's log q (topk_kl_logq): d kl / d z_j = g (q_j - p_j)
// without recomputing the k dot products; only the gathered rows are read again.
// The same arithmetic as topk_kl_backward_kernel, so the gradients are bitwise equal.
template <typename scalar_t, typename logp_t>
void topk_kl_backward_logq_kernel(const at::Tensor& grad_kl, const at::Tensor& hidden,
                                  const at::Tensor& unembed,
                                  const c10::optional<at::Tensor>& norm_weight, double eps,
                                  const at::Tensor& target_idx, const at::Tensor& target_logp,
                                  const at::Tensor& logq, at::Tensor& grad_hidden) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = hidden.size(0), D = hidden.size(1), k = target_idx.size(1);
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const bool has_norm = norm_weight.has_value() && norm_weight->defined();
  const at::Tensor h = hidden.to(acc_dtype).contiguous();
  const at::Tensor w = has_norm ? norm_weight->to(acc_dtype).contiguous() : at::Tensor();
  const acc_t* H = h.data_ptr<acc_t>();
  const acc_t* W = has_norm ? w.data_ptr<acc_t>() : nullptr;
  const scalar_t* U = unembed.data_ptr<scalar_t>();
  const int64_t* I = target_idx.data_ptr<int64_t>();
  const logp_t* LP = target_logp.data_ptr<logp_t>();
  const acc_t* LQ = logq.data_ptr<acc_t>();
  const acc_t* G = grad_kl.data_ptr<acc_t>();
  scalar_t* GH = grad_hidden.data_ptr<scalar_t>();

  const int64_t V = unembed.size(0);
  std::atomic<bool> out_of_range{false};
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    std::vector<acc_t> gx(D), buf(D);
    for (int64_t i = b; i < e; ++i) {
      const int64_t* idx = I + i * k;
      if (std::any_of(idx, idx + k, [V](int64_t v) { return v < 0 || v >= V; })) {
        out_of_range = true;  // checked while the row is in cache: no separate pass
        continue;
      }
      std::fill(gx.begin(), gx.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        if (j + 1 < k) prefetch_row(U + idx[j + 1] * D, D);
        const acc_t p = std::exp(static_cast<acc_t>(LP[i * k + j]));
        const acc_t gz = G[i] * (std::exp(LQ[i * k + j]) - p);
        axpy<acc_t>(gz, widen<scalar_t, acc_t>(U + idx[j] * D, D, buf.data()), gx.data(), D);
      }
      norm_backward<scalar_t, acc_t>(gx.data(), H + i * D, W, D, eps, GH + i * D);
    }
  });
  TORCH_CHECK_INDEX(!out_of_range, "actreplay.topk_kl_backward_logq: argument 'target_idx' must hold "
                    "indices in [0, V = ", V, ")");
}

template <typename F>
void dispatch_logp(const at::Tensor& target_logp, F&& f) {
  if (target_logp.scalar_type() == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

}  // namespace

at::Tensor topk_logp_cpu(const at::Tensor& hidden, const at::Tensor& unembed,
                         const c10::optional<at::Tensor>& norm_weight, double eps,
                         const at::Tensor& target_idx) {
  const int64_t M = hidden.size(0), D = hidden.size(1), k = target_idx.size(1);
  at::Tensor out = at::empty({M, k}, hidden.options().dtype(result_dtype(hidden)));
  if (M == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(),
                                  "actreplay_topk_logp_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor xn = rms_normalize(hidden, norm_weight, eps,
                                        c10::CppTypeToScalarType<acc_t>::value);
    const acc_t* X = xn.data_ptr<acc_t>();
    const scalar_t* U = unembed.data_ptr<scalar_t>();
    const int64_t* I = target_idx.data_ptr<int64_t>();
    acc_t* O = out.data_ptr<acc_t>();
    at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
      std::vector<acc_t> buf(D);
      for (int64_t i = b; i < e; ++i) row_logq<scalar_t, acc_t>(X + i * D, U, D, I + i * k, k, O + i * k, buf.data());
    });
  });
  return out;
}

at::Tensor topk_kl_cpu(const at::Tensor& hidden, const at::Tensor& unembed,
                       const c10::optional<at::Tensor>& norm_weight, double eps,
                       const at::Tensor& target_idx, const at::Tensor& target_logp) {
  at::Tensor out = at::empty({hidden.size(0)}, hidden.options().dtype(result_dtype(hidden)));
  if (hidden.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(),
                                  "actreplay_topk_kl_cpu", [&] {
                                    dispatch_logp(target_logp, [&](auto tag) {
                                      using logp_t = decltype(tag);
                                      topk_kl_forward_kernel<scalar_t, logp_t>(
                                          hidden, unembed, norm_weight, eps, target_idx,
                                          target_logp, out);
                                    });
                                  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> topk_kl_logq_cpu(const at::Tensor& hidden, const at::Tensor& unembed,
                                                    const c10::optional<at::Tensor>& norm_weight,
                                                    double eps, const at::Tensor& target_idx,
                                                    const at::Tensor& target_logp) {
  const auto dtype = result_dtype(hidden);
  at::Tensor out = at::empty({hidden.size(0)}, hidden.options().dtype(dtype));
  at::Tensor logq = at::empty(target_idx.sizes(), hidden.options().dtype(dtype));
  if (hidden.size(0) == 0) return {out, logq};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(),
                                  "actreplay_topk_kl_logq_cpu", [&] {
                                    dispatch_logp(target_logp, [&](auto tag) {
                                      using logp_t = decltype(tag);
                                      topk_kl_forward_kernel<scalar_t, logp_t>(
                                          hidden, unembed, norm_weight, eps, target_idx,
                                          target_logp, out,
                                          logq.data_ptr<at::opmath_type<scalar_t>>());
                                    });
                                  });
  return {out, logq};
}

at::Tensor topk_kl_backward_logq_cpu(const at::Tensor& grad_kl, const at::Tensor& hidden,
                                     const at::Tensor& unembed,
                                     const c10::optional<at::Tensor>& norm_weight, double eps,
                                     const at::Tensor& target_idx, const at::Tensor& target_logp,
                                     const at::Tensor& logq) {
  at::Tensor grad_hidden = at::empty_like(hidden);
  if (hidden.size(0) == 0) return grad_hidden;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(),
                                  "actreplay_topk_kl_backward_logq_cpu", [&] {
                                    dispatch_logp(target_logp, [&](auto tag) {
                                      using logp_t = decltype(tag);
                                      topk_kl_backward_logq_kernel<scalar_t, logp_t>(
                                          grad_kl, hidden, unembed, norm_weight, eps,
                                          target_idx, target_logp, logq, grad_hidden);
                                    });
                                  });
  return grad_hidden;
}

at::Tensor topk_kl_backward_cpu(const at::Tensor& grad_kl, const at::Tensor& hidden,
                                const at::Tensor& unembed,
                                const c10::optional<at::Tensor>& norm_weight, double eps,
                                const at::Tensor& target_idx, const at::Tensor& target_logp) {
  at::Tensor grad_hidden = at::empty_like(hidden);
  if (hidden.size(0) == 0) return grad_hidden;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(),
                                  "actreplay_topk_kl_backward_cpu", [&] {
                                    dispatch_logp(target_logp, [&](auto tag) {
                                      using logp_t = decltype(tag);
                                      topk_kl_backward_kernel<scalar_t, logp_t>(
                                          grad_kl, hidden, unembed, norm_weight, eps,
                                          target_idx, target_logp, grad_hidden);
                                    });
                                  });
  return grad_hidden;
}

}  // namespace actreplay

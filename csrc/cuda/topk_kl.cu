// topk_kl on CUDA (forward and backward): per row i, the logit lens of
// hidden[i] gathered at the k vocabulary rows target_idx[i, :] only.
//
// Design: one block (256 threads) per row; the grid's x dimension is the row.
//   1. RMSNorm (when norm_weight is given): block reduction of sum(h^2) in the
//      accumulation type acc_t (float for half/bf16/float, double for double),
//      r = 1 / sqrt(mean + eps); xn_d = h_d * r * w_d (acc_t) is kept in X.
//   2. z_j = dot(xn, U[target_idx[i, j]]): warp w takes j = w, w + 8, ...; its
//      lanes stream the D-long unembedding row in 16-byte vectors (coalesced)
//      when D and the pointer allow it, accumulate in acc_t, warp-reduce with
//      shuffles; lane 0 stores z_j in Z. Duplicated indices are just separate j.
//   3. log-softmax over the k gathered logits and the KL sum, in double (k is
//      small, so this costs nothing and avoids cancellation in KL ~ 0):
//      kl = sum_j p_j (lp_j - (z_j - lse_z)), p_j = exp(lp_j); p_j == 0 terms
//      (lp_j = -inf) are skipped, so they contribute exactly 0, never NaN.
//   log q_j is rounded to the result type (logq(): float32, float64 for a
//   float64 model), the value topk_logp returns, so targets made by topk_logp
//   from the same rows give KL 0 exactly, whatever the targets' own type.
//   topk_kl_logq's forward also writes that log q ([M, k]); its backward then
//   skips step 2 (only r is recomputed, one D-long reduction) and reads log q,
//   so the unembedding rows are read once per step instead of twice.
//   Backward, same 1-2 (or log q), then gz_j = g (q_j - p_j) (targets sum to 1), which
//   overwrites Z; each thread owns a set of D-vectors and computes
//   gxn_d = sum_j gz_j U[idx_j, d] (coalesced across the block for every j).
//   Without norm_weight grad_h = gxn; with it u_d = gxn_d w_d (stored over X),
//   S = sum_e u_e h_e (block reduction) and grad_h_d = r u_d - r^3 h_d S / D.
// X (D values) and Z (k values) live in dynamic shared memory when they fit
// a 40 KiB budget (X at most 32 KiB); otherwise in a global scratch tensor
// ([M, D] or [M, k] in acc_t). Shared memory stays under 48 KiB, so no opt-in
// attribute is needed. Argument validation is done by the caller, except the
// index range of the backward from log q: its inputs are not re-validated (no
// pass over the data, no host sync), so its kernel checks each index as it
// reads it and stops with a device-side assertion, as torch's gather does.

#include "ops.h"
#include "cuda/device_reduce.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace actreplay {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr size_t kSmemBudget = 40 * 1024;  // dynamic shared memory, bytes
constexpr size_t kXSmemMax = 32 * 1024;    // of which X at most

template <typename T, int N>
struct alignas(sizeof(T) * N) VecT {
  T v[N];
};

// r = 1 / sqrt(mean(h^2) + eps) of one row, a block reduction: the forward and
// both backward paths call this one function, so they get the same r bitwise.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t row_rms_r(const scalar_t* __restrict__ h_row, acc_t eps, int64_t D,
                                           acc_t* red) {
  acc_t ss = acc_t(0);
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    const acc_t x = static_cast<acc_t>(h_row[d]);
    ss += x * x;
  }
  ss = block_sum<kWarps>(ss, red);
  return acc_t(1) / acc_sqrt(ss / static_cast<acc_t>(D) + eps);
}

// Steps 1-2 for one row: fills X with xn (acc_t) and Z with the k gathered
// logits, returns r (1 without norm). Ends with a barrier, so X and Z are
// visible to the whole block afterwards.
template <typename scalar_t, typename acc_t, int VEC>
__device__ acc_t gathered_logits(const scalar_t* __restrict__ h_row,
                                 const scalar_t* __restrict__ U,
                                 const scalar_t* __restrict__ w, acc_t eps, int64_t D,
                                 const int64_t* __restrict__ idx_row, int64_t k, acc_t* X,
                                 acc_t* Z, acc_t* red) {
  acc_t r = acc_t(1);
  if (w != nullptr) {
    r = row_rms_r<scalar_t, acc_t>(h_row, eps, D, red);
    for (int64_t d = threadIdx.x; d < D; d += kThreads) {
      X[d] = static_cast<acc_t>(h_row[d]) * r * static_cast<acc_t>(w[d]);
    }
  } else {
    for (int64_t d = threadIdx.x; d < D; d += kThreads) X[d] = static_cast<acc_t>(h_row[d]);
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t j = warp; j < k; j += kWarps) {
    const scalar_t* u = U + idx_row[j] * D;
    acc_t acc = acc_t(0);
    if constexpr (VEC > 1) {
      // D % VEC == 0 and U is 16-byte aligned (host check). X rows start at a
      // multiple of VEC * sizeof(acc_t) bytes (a multiple of 16), so X is read
      // in 16-byte pieces too.
      constexpr int XV = 16 / static_cast<int>(sizeof(acc_t));
      static_assert(VEC % XV == 0, "X vector width must divide VEC");
      using UV = VecT<scalar_t, VEC>;
      using XVT = VecT<acc_t, XV>;
      const UV* uv = reinterpret_cast<const UV*>(u);
      const int64_t nvec = D / VEC;
#pragma unroll 4
      for (int64_t c = lane; c < nvec; c += 32) {
        const UV x = uv[c];
#pragma unroll
        for (int p = 0; p < VEC / XV; ++p) {
          const XVT xn = reinterpret_cast<const XVT*>(X + c * VEC)[p];
#pragma unroll
          for (int q = 0; q < XV; ++q) acc += static_cast<acc_t>(x.v[p * XV + q]) * xn.v[q];
        }
      }
    } else {
      for (int64_t d = lane; d < D; d += 32) acc += static_cast<acc_t>(u[d]) * X[d];
    }
    acc = warp_sum(acc);
    if (lane == 0) Z[j] = acc;
  }
  __syncthreads();
  return r;
}

// Row pointers into shared memory or the global scratch tensors.
template <typename acc_t>
__device__ __forceinline__ void row_buffers(acc_t* xg, acc_t* zg, int64_t i, int64_t D,
                                            int64_t k, acc_t*& X, acc_t*& Z) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* s = reinterpret_cast<acc_t*>(smem);
  X = xg != nullptr ? xg + i * D : s;
  Z = zg != nullptr ? zg + i * k : s + (xg != nullptr ? 0 : D);
}

// log-sum-exp of the k logits in Z, in double (a block reduction): the one
// function the forward and the recomputing backward both take it from.
template <typename acc_t>
__device__ __forceinline__ double block_lse(const acc_t* Z, int64_t k, double* s_red) {
  double mz = -std::numeric_limits<double>::infinity();
  for (int64_t j = threadIdx.x; j < k; j += kThreads) mz = fmax(mz, static_cast<double>(Z[j]));
  mz = block_max<kWarps>(mz, s_red);
  double se = 0.0;
  for (int64_t j = threadIdx.x; j < k; j += kThreads) se += exp(static_cast<double>(Z[j]) - mz);
  se = block_sum<kWarps>(se, s_red);
  return mz + log(se);
}

// log q_j = z_j - lse in double, rounded to the result type acc_t: the one
// value of log q that topk_logp (the targets), the KL, the log q the forward
// keeps and both backwards use, so a model replayed against an exact copy of
// itself has KL and gradient exactly 0. (Not the targets' type: float32
// targets of a float64 model would round the float64 KL to float32 accuracy,
// and gradcheck's finite differences would see that noise.)
template <typename acc_t>
__device__ __forceinline__ acc_t logq(acc_t z, double lse) {
  return static_cast<acc_t>(static_cast<double>(z) - lse);
}

template <typename scalar_t, typename lp_t, int VEC>
__global__ void __launch_bounds__(kThreads)
topk_kl_fwd_kernel(const scalar_t* __restrict__ hidden, const scalar_t* __restrict__ U,
                   const scalar_t* __restrict__ w, at::opmath_type<scalar_t> eps,
                   const int64_t* __restrict__ target_idx, const lp_t* __restrict__ target_logp,
                   at::opmath_type<scalar_t>* __restrict__ kl_out, int64_t D, int64_t k,
                   at::opmath_type<scalar_t>* xg, at::opmath_type<scalar_t>* zg,
                   at::opmath_type<scalar_t>* __restrict__ logq_out) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t s_acc[kWarps];
  __shared__ double s_red[kWarps];
  const int64_t i = blockIdx.x;
  acc_t* X;
  acc_t* Z;
  row_buffers(xg, zg, i, D, k, X, Z);
  const int64_t* idx_row = target_idx + i * k;
  const lp_t* lp_row = target_logp + i * k;
  gathered_logits<scalar_t, acc_t, VEC>(hidden + i * D, U, w, eps, D, idx_row, k, X, Z, s_acc);

  const double lse = block_lse(Z, k, s_red);
  if (logq_out != nullptr) {  // topk_logp, topk_kl_logq: the log q the KL below reads
    for (int64_t j = threadIdx.x; j < k; j += kThreads)
      logq_out[i * k + j] = logq(Z[j], lse);
    if (kl_out == nullptr) return;  // topk_logp
  }
  double kl = 0.0;
  for (int64_t j = threadIdx.x; j < k; j += kThreads) {
    const double lp = static_cast<double>(lp_row[j]);
    const double p = exp(lp);
    if (p == 0.0) continue;  // lp = -inf (or underflow): contributes exactly 0
    kl += p * (lp - static_cast<double>(logq(Z[j], lse)));
  }
  kl = block_sum<kWarps>(kl, s_red);
  if (threadIdx.x == 0) kl_out[i] = static_cast<acc_t>(kl);
}

// Backward, recomputing: Z holds the k gathered logits; overwrites it with
// dkl/dz_j = g * (q_j - p_j) for targets p that sum to 1. Ends with a barrier.
template <typename lp_t, typename acc_t>
__device__ void logits_to_grad(acc_t* Z, const lp_t* __restrict__ lp_row, int64_t k, double g,
                               double* s_red) {
  const double lse = block_lse(Z, k, s_red);
  // Each thread rewrites only the Z entries it read itself above.
  for (int64_t j = threadIdx.x; j < k; j += kThreads) {
    const double q = exp(static_cast<double>(logq(Z[j], lse)));
    const double p = exp(static_cast<double>(lp_row[j]));
    Z[j] = static_cast<acc_t>(g * (q - p));
  }
  __syncthreads();  // all of Z (now gz) visible; X (xn) no longer read
}

template <typename scalar_t, typename lp_t, int VEC>
__global__ void __launch_bounds__(kThreads)
topk_kl_bwd_kernel(const at::opmath_type<scalar_t>* __restrict__ grad_kl,
                   const scalar_t* __restrict__ hidden, const scalar_t* __restrict__ U,
                   const scalar_t* __restrict__ w, at::opmath_type<scalar_t> eps,
                   const int64_t* __restrict__ target_idx, const lp_t* __restrict__ target_logp,
                   scalar_t* __restrict__ grad_hidden, int64_t D, int64_t k,
                   at::opmath_type<scalar_t>* xg, at::opmath_type<scalar_t>* zg,
                   const at::opmath_type<scalar_t>* __restrict__ logq_in, int64_t vocab) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t s_acc[kWarps];
  __shared__ double s_red[kWarps];
  const int64_t i = blockIdx.x;
  acc_t* X;
  acc_t* Z;
  row_buffers(xg, zg, i, D, k, X, Z);
  const int64_t* idx_row = target_idx + i * k;
  const lp_t* lp_row = target_logp + i * k;
  const scalar_t* h_row = hidden + i * D;
  scalar_t* g_row = grad_hidden + i * D;
  const double g = static_cast<double>(grad_kl[i]);
  acc_t r = acc_t(1);
  if (logq_in != nullptr) {
    // From the forward's log q: only r again (row_rms_r, as the forward), then
    // gz_j as logits_to_grad makes it, bitwise (the same rounded log q).
    if (w != nullptr) r = row_rms_r<scalar_t, acc_t>(h_row, eps, D, s_acc);
    int bad = 0;
    for (int64_t j = threadIdx.x; j < k; j += kThreads) {
      bad |= idx_row[j] < 0 || idx_row[j] >= vocab;
      const double q = exp(static_cast<double>(logq_in[i * k + j]));
      const double p = exp(static_cast<double>(lp_row[j]));
      Z[j] = static_cast<acc_t>(g * (q - p));
    }
    if (__syncthreads_or(bad)) {  // a barrier too: all of Z visible below
      CUDA_KERNEL_ASSERT(!bad && "topk_kl_backward_logq: target_idx must hold indices in [0, V)");
      return;  // the whole block: no row of U outside [0, V) is read
    }
  } else {
    r = gathered_logits<scalar_t, acc_t, VEC>(h_row, U, w, eps, D, idx_row, k, X, Z, s_acc);
    logits_to_grad<lp_t>(Z, lp_row, k, g, s_red);
  }

  // gxn_d = sum_j gz_j U[idx_j, d]. Thread t owns the D-vectors t, t + 256, ...
  // and, with a norm, keeps u_d = gxn_d w_d in X[d] (its own entries only).
  acc_t S = acc_t(0);
  constexpr int V = VEC;
  const int64_t nvec = D / V;  // V == 1 or D % V == 0
  for (int64_t c = threadIdx.x; c < nvec; c += kThreads) {
    acc_t a[V];
#pragma unroll
    for (int q = 0; q < V; ++q) a[q] = acc_t(0);
#pragma unroll 4
    for (int64_t j = 0; j < k; ++j) {
      const acc_t gz = Z[j];
      const scalar_t* u = U + idx_row[j] * D;
      if constexpr (V > 1) {
        const VecT<scalar_t, V> x = reinterpret_cast<const VecT<scalar_t, V>*>(u)[c];
#pragma unroll
        for (int q = 0; q < V; ++q) a[q] += gz * static_cast<acc_t>(x.v[q]);
      } else {
        a[0] += gz * static_cast<acc_t>(u[c]);
      }
    }
#pragma unroll
    for (int q = 0; q < V; ++q) {
      const int64_t d = c * V + q;
      if (w != nullptr) {
        const acc_t ud = a[q] * static_cast<acc_t>(w[d]);
        X[d] = ud;
        S += ud * static_cast<acc_t>(h_row[d]);
      } else {
        g_row[d] = static_cast<scalar_t>(a[q]);
      }
    }
  }
  if (w == nullptr) return;  // uniform across the block

  // grad_h_d = r u_d - r^3 h_d S / D
  S = block_sum<kWarps>(S, s_acc);
  const acc_t coef = r * r * r * S / static_cast<acc_t>(D);
  for (int64_t c = threadIdx.x; c < nvec; c += kThreads) {
#pragma unroll
    for (int q = 0; q < V; ++q) {
      const int64_t d = c * V + q;
      g_row[d] = static_cast<scalar_t>(r * X[d] - coef * static_cast<acc_t>(h_row[d]));
    }
  }
}

struct Launch {
  size_t smem = 0;
  bool x_global = false;
  bool z_global = false;
};

Launch plan_buffers(int64_t D, int64_t k, size_t acc_size) {
  Launch p;
  const size_t xbytes = static_cast<size_t>(D) * acc_size;
  const size_t zbytes = static_cast<size_t>(k) * acc_size;
  if (xbytes <= kXSmemMax) {
    p.smem += xbytes;
  } else {
    p.x_global = true;
  }
  if (p.smem + zbytes <= kSmemBudget) {
    p.smem += zbytes;
  } else {
    p.z_global = true;
  }
  return p;
}

template <typename scalar_t>
bool can_vectorize(const at::Tensor& unembed, int64_t D) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));
  return D % kVec == 0 && reinterpret_cast<uintptr_t>(unembed.data_ptr()) % 16 == 0;
}

const void* optional_ptr(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr() : nullptr;
}

// Runs the forward (grad == nullptr) or backward kernel for one dtype pair.
// Forward: the KL into `out` (logq_only: log q into `out`, topk_logp) and, when
// `logq` is given, log q into it too (topk_kl_logq). Backward: the gradient
// into `out`, from `logq` when given instead of recomputing the logits.
template <typename scalar_t, typename lp_t>
void run_topk_kl(const at::Tensor* grad_kl, const at::Tensor& hidden, const at::Tensor& unembed,
                 const c10::optional<at::Tensor>& norm_weight, double eps,
                 const at::Tensor& target_idx, const at::Tensor& target_logp, at::Tensor& out,
                 bool logq_only, at::Tensor* logq) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = hidden.size(0);
  const int64_t D = hidden.size(1);
  const int64_t k = target_idx.size(1);
  const Launch plan = plan_buffers(D, k, sizeof(acc_t));
  const auto acc_opts = hidden.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor xs, zs;
  if (plan.x_global) xs = at::empty({M, D}, acc_opts);
  if (plan.z_global) zs = at::empty({M, std::max<int64_t>(k, 1)}, acc_opts);
  acc_t* xg = plan.x_global ? xs.data_ptr<acc_t>() : nullptr;
  acc_t* zg = plan.z_global ? zs.data_ptr<acc_t>() : nullptr;
  const scalar_t* w = static_cast<const scalar_t*>(optional_ptr(norm_weight));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned int>(M));
  constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));
  const bool vec = can_vectorize<scalar_t>(unembed, D);
  const acc_t eps_acc = static_cast<acc_t>(eps);

  if (grad_kl == nullptr) {
    auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, plan.smem, stream>>>(
          hidden.data_ptr<scalar_t>(), unembed.data_ptr<scalar_t>(), w, eps_acc,
          target_idx.data_ptr<int64_t>(), target_logp.data_ptr<lp_t>(),
          logq_only ? nullptr : out.data_ptr<acc_t>(), D, k, xg, zg,
          logq_only ? out.data_ptr<acc_t>() : logq != nullptr ? logq->data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) {
      launch(topk_kl_fwd_kernel<scalar_t, lp_t, kVec>);
    } else {
      launch(topk_kl_fwd_kernel<scalar_t, lp_t, 1>);
    }
  } else {
    auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, plan.smem, stream>>>(
          grad_kl->data_ptr<acc_t>(), hidden.data_ptr<scalar_t>(), unembed.data_ptr<scalar_t>(),
          w, eps_acc, target_idx.data_ptr<int64_t>(), target_logp.data_ptr<lp_t>(),
          out.data_ptr<scalar_t>(), D, k, xg, zg,
          logq != nullptr ? logq->data_ptr<acc_t>() : nullptr, unembed.size(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) {
      launch(topk_kl_bwd_kernel<scalar_t, lp_t, kVec>);
    } else {
      launch(topk_kl_bwd_kernel<scalar_t, lp_t, 1>);
    }
  }
}

void dispatch_topk_kl(const at::Tensor* grad_kl, const at::Tensor& hidden,
                      const at::Tensor& unembed, const c10::optional<at::Tensor>& norm_weight,
                      double eps, const at::Tensor& target_idx, const at::Tensor& target_logp,
                      at::Tensor& out, bool logq_only = false, at::Tensor* logq = nullptr) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hidden.scalar_type(), "topk_kl_cuda", [&] {
        using hidden_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES(target_logp.scalar_type(), "topk_kl_cuda_logp", [&] {
          run_topk_kl<hidden_t, scalar_t>(grad_kl, hidden, unembed, norm_weight, eps,
                                          target_idx, target_logp, out, logq_only, logq);
        });
      });
}

}  // namespace

at::Tensor topk_kl_cuda(const at::Tensor& hidden, const at::Tensor& unembed,
                        const c10::optional<at::Tensor>& norm_weight, double eps,
                        const at::Tensor& target_idx, const at::Tensor& target_logp) {
  c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t M = hidden.size(0);
  at::Tensor kl = at::empty({M}, hidden.options().dtype(result_dtype(hidden)));
  if (M == 0) return kl;
  TORCH_CHECK(M <= static_cast<int64_t>(INT32_MAX), "topk_kl: too many rows (", M, ")");
  dispatch_topk_kl(nullptr, hidden, unembed, norm_weight, eps, target_idx, target_logp, kl);
  return kl;
}

std::tuple<at::Tensor, at::Tensor> topk_kl_logq_cuda(const at::Tensor& hidden, const at::Tensor& unembed,
                                                     const c10::optional<at::Tensor>& norm_weight,
                                                     double eps, const at::Tensor& target_idx,
                                                     const at::Tensor& target_logp) {
  c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t M = hidden.size(0);
  const auto opts = hidden.options().dtype(result_dtype(hidden));
  at::Tensor kl = at::empty({M}, opts);
  at::Tensor logq = at::empty(target_idx.sizes(), opts);
  if (M == 0) return {kl, logq};
  TORCH_CHECK(M <= static_cast<int64_t>(INT32_MAX), "topk_kl_logq: too many rows (", M, ")");
  dispatch_topk_kl(nullptr, hidden, unembed, norm_weight, eps, target_idx, target_logp, kl, false,
                   &logq);
  return {kl, logq};
}

at::Tensor topk_logp_cuda(const at::Tensor& hidden, const at::Tensor& unembed,
                          const c10::optional<at::Tensor>& norm_weight, double eps,
                          const at::Tensor& target_idx) {
  c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t M = hidden.size(0);
  // The targets' type (float32, float64 for float64 models) is the log q's.
  at::Tensor out = at::empty({M, target_idx.size(1)}, hidden.options().dtype(result_dtype(hidden)));
  if (M == 0) return out;
  TORCH_CHECK(M <= static_cast<int64_t>(INT32_MAX), "topk_logp: too many rows (", M, ")");
  dispatch_topk_kl(nullptr, hidden, unembed, norm_weight, eps, target_idx, out, out, true);
  return out;
}

at::Tensor topk_kl_backward_cuda(const at::Tensor& grad_kl, const at::Tensor& hidden,
                                 const at::Tensor& unembed,
                                 const c10::optional<at::Tensor>& norm_weight, double eps,
                                 const at::Tensor& target_idx,
                                 const at::Tensor& target_logp) {
  c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t M = hidden.size(0);
  at::Tensor grad_hidden = at::empty_like(hidden, at::MemoryFormat::Contiguous);
  if (M == 0 || hidden.size(1) == 0) return grad_hidden;
  TORCH_CHECK(M <= static_cast<int64_t>(INT32_MAX), "topk_kl_backward: too many rows (", M, ")");
  // Autograd may hand over an expanded (stride-0) or differently typed grad.
  const at::Tensor g = grad_kl.to(result_dtype(hidden)).contiguous();
  dispatch_topk_kl(&g, hidden, unembed, norm_weight, eps, target_idx, target_logp, grad_hidden);
  return grad_hidden;
}

at::Tensor topk_kl_backward_logq_cuda(const at::Tensor& grad_kl, const at::Tensor& hidden,
                                      const at::Tensor& unembed,
                                      const c10::optional<at::Tensor>& norm_weight, double eps,
                                      const at::Tensor& target_idx, const at::Tensor& target_logp,
                                      const at::Tensor& logq) {
  c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t M = hidden.size(0);
  at::Tensor grad_hidden = at::empty_like(hidden, at::MemoryFormat::Contiguous);
  if (M == 0 || hidden.size(1) == 0) return grad_hidden;
  TORCH_CHECK(M <= static_cast<int64_t>(INT32_MAX), "topk_kl_backward_logq: too many rows (", M, ")");
  at::Tensor lq = logq;  // contiguous, result dtype: checked by the caller
  dispatch_topk_kl(&grad_kl, hidden, unembed, norm_weight, eps, target_idx, target_logp, grad_hidden,
                   false, &lq);
  return grad_hidden;
}

}  // namespace actreplay

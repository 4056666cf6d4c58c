// select_tokens on CUDA: per layer row l of entropy[L, N], the low- or
// high-entropy subset of the candidate tokens (SPEC §3-4).
//
// Design:
//   1. select_stats_kernel, one block per layer row: block reductions give the
//      candidate count n_cand and (rule "ratio") the candidate maximum. For the
//      threshold rules ("ratio": E <= value_l * max, "absolute": E < value_l)
//      a second pass over the row either writes the mask directly (side "low",
//      nothing else to do) or counts the low set (side "high"). For rule
//      "topk" it only computes the count c_l = value_l (if >= 1) or
//      floor(value_l * n_cand), clamped to [0, n_cand]. Thresholds are
//      computed in the entropy dtype, exactly as the CPU kernel does
//      (e_t(value) * max, e_t(value)), so both agree at the boundary.
//   2. Count-based cases (rule "topk", or side "high"): the c_l first
//      candidates of row l in a total order are selected. Each element gets an
//      int64 sort key that encodes its entropy monotonically (the usual
//      IEEE-754 bit trick on the double value; -0.0 is folded into +0.0 so the
//      two zeros tie) — ascending entropy for side "low", the bitwise
//      complement (descending entropy) for side "high"; non-candidates get
//      INT64_MAX, which no candidate key can reach (candidates are never NaN).
//      A stable at::sort along dim 1 (a segmented device sort, O(N log N) per
//      row) then orders equal keys by lower index, which is exactly the
//      required tie-break. select_mark_kernel sets mask[l, order[l, r]] for
//      r < c_l. Memory: three [L, N] int64 tensors (keys, sorted keys, order).
// Argument validation is done by the caller; candidate entropies are non-NaN.

#include "ops.h"
#include "cuda/device_reduce.cuh"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace actreplay {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

enum Rule : int { kRatio = 0, kAbsolute = 1, kTopk = 2 };

template <typename e_t>
__global__ void __launch_bounds__(kThreads)
select_stats_kernel(const e_t* __restrict__ entropy, const bool* __restrict__ cand,
                    const double* __restrict__ value, int64_t value_len, int64_t N, int rule,
                    bool side_low, int64_t* __restrict__ count, bool* __restrict__ mask) {
  __shared__ int64_t s_i64[kWarps];
  __shared__ double s_f64[kWarps];
  const int64_t l = blockIdx.x;
  const e_t* row = entropy + l * N;
  const double v = value[value_len == 1 ? 0 : l];

  int64_t nc = 0;
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t i = threadIdx.x; i < N; i += kThreads) {
    if (cand[i]) {
      ++nc;
      mx = fmax(mx, static_cast<double>(row[i]));
    }
  }
  const int64_t n_cand = block_sum<kWarps>(nc, s_i64);

  if (rule == kTopk) {
    if (threadIdx.x == 0) {
      // value >= 1 is a count, below 1 a fraction of n_cand; clamp before the
      // conversion so a huge or NaN value cannot overflow it.
      const double c = v >= 1.0 ? floor(v) : floor(v * static_cast<double>(n_cand));
      int64_t ci = 0;
      if (c >= static_cast<double>(n_cand)) {
        ci = n_cand;
      } else if (c > 0.0) {
        ci = static_cast<int64_t>(c);
      }
      count[l] = ci;
    }
    return;
  }

  // Thresholds in the entropy dtype, as the CPU kernel computes them:
  // "absolute": E < e_t(value_l); "ratio": E <= e_t(value_l) * max (the max
  // is exact in double and converts back exactly).
  e_t thr = static_cast<e_t>(v);
  if (rule == kRatio) thr = thr * static_cast<e_t>(block_max<kWarps>(mx, s_f64));

  int64_t nlow = 0;
  for (int64_t i = threadIdx.x; i < N; i += kThreads) {
    if (!cand[i]) continue;
    const e_t e = row[i];
    const bool low = rule == kRatio ? (e <= thr) : (e < thr);
    if (low) {
      if (side_low) {
        mask[l * N + i] = true;
      } else {
        ++nlow;
      }
    }
  }
  if (!side_low) {
    const int64_t c = block_sum<kWarps>(nlow, s_i64);
    if (threadIdx.x == 0) count[l] = c;
  }
}

// Sort key: ascending entropy (side low) or descending entropy (side high);
// non-candidates last. Ties in the key are left to the stable sort (index order).
template <typename e_t>
__global__ void __launch_bounds__(kThreads)
select_keys_kernel(const e_t* __restrict__ entropy, const bool* __restrict__ cand, int64_t N,
                   int64_t total, bool high, int64_t* __restrict__ keys) {
  constexpr uint64_t kSign = 0x8000000000000000ull;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = e % N;
    int64_t key = std::numeric_limits<int64_t>::max();
    if (cand[i]) {
      double x = static_cast<double>(entropy[e]);
      if (x == 0.0) x = 0.0;  // fold -0.0 into +0.0
      uint64_t u = static_cast<uint64_t>(__double_as_longlong(x));
      u = (u & kSign) ? ~u : (u | kSign);               // unsigned order == numeric order
      const int64_t s = static_cast<int64_t>(u ^ kSign);  // signed order == numeric order
      // s is never INT64_MIN/INT64_MAX for a non-NaN value, so ~s (reversed
      // order) never collides with the non-candidate key either.
      key = high ? ~s : s;
    }
    keys[e] = key;
  }
}

__global__ void __launch_bounds__(kThreads)
select_mark_kernel(const int64_t* __restrict__ order, const int64_t* __restrict__ count, int64_t N,
                   int64_t total, bool* __restrict__ mask) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t l = e / N;
    const int64_t r = e - l * N;
    if (r < count[l]) mask[l * N + order[e]] = true;
  }
}

unsigned int elementwise_blocks(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(b, 1), int64_t{1} << 20));
}

}  // namespace

at::Tensor select_tokens_cuda(const at::Tensor& entropy, const at::Tensor& candidates,
                              const std::string& rule, at::ArrayRef<double> value,
                              const std::string& side) {
  c10::cuda::CUDAGuard guard(entropy.device());
  int rule_id = kRatio;
  if (rule == "ratio") {
    rule_id = kRatio;
  } else if (rule == "absolute") {
    rule_id = kAbsolute;
  } else if (rule == "topk") {
    rule_id = kTopk;
  } else {
    TORCH_CHECK(false, "select_tokens: unknown rule '", rule, "'");
  }
  TORCH_CHECK(side == "low" || side == "high", "select_tokens: unknown side '", side, "'");
  const bool side_low = (side == "low");

  const int64_t L = entropy.size(0);
  const int64_t N = entropy.size(1);
  at::Tensor mask = at::zeros({L, N}, entropy.options().dtype(at::kBool));
  if (L == 0 || N == 0) return mask;
  const int64_t value_len = static_cast<int64_t>(value.size());
  TORCH_CHECK(value_len == 1 || value_len == L, "select_tokens: expected 1 or ", L,
              " values, got ", value_len);
  TORCH_CHECK(L <= static_cast<int64_t>(INT32_MAX), "select_tokens: too many layers (", L, ")");

  const at::Tensor value_dev =
      at::tensor(value, at::TensorOptions().dtype(at::kDouble)).to(entropy.device());
  at::Tensor count = at::empty({L}, entropy.options().dtype(at::kLong));
  const bool need_rank = (rule_id == kTopk) || !side_low;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(entropy.scalar_type(), "select_tokens_cuda", [&] {
    select_stats_kernel<scalar_t><<<static_cast<unsigned int>(L), kThreads, 0, stream>>>(
        entropy.data_ptr<scalar_t>(), candidates.data_ptr<bool>(),
        value_dev.data_ptr<double>(), value_len, N, rule_id, side_low,
        count.data_ptr<int64_t>(), mask.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!need_rank) return;
    const int64_t total = L * N;
    at::Tensor keys = at::empty({L, N}, entropy.options().dtype(at::kLong));
    select_keys_kernel<scalar_t><<<elementwise_blocks(total), kThreads, 0, stream>>>(
        entropy.data_ptr<scalar_t>(), candidates.data_ptr<bool>(), N, total, !side_low,
        keys.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Stable: equal keys keep increasing index order (the tie-break rule).
    const at::Tensor order =
        std::get<1>(at::sort(keys, /*stable=*/true, /*dim=*/1, /*descending=*/false))
            .contiguous();
    select_mark_kernel<<<elementwise_blocks(total), kThreads, 0, stream>>>(
        order.data_ptr<int64_t>(), count.data_ptr<int64_t>(), N, total,
        mask.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return mask;
}

}  // namespace actreplay

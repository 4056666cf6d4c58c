// replay_scatter on CUDA: out = hidden.clone(), then row m of `values` is
// added to ("add") or written over ("replace") row positions[m] of out.
//
// Design: one block per row m of `values` (grid x = M, up to 2^31-1); the
// block's threads stride over the D columns, in 16-byte vectors (8 half/bf16,
// 4 float, 2 double) when D and the pointers allow it, else one element at a
// time.
//   - "replace": positions are unique (the caller checks), so every block
//     writes its own row with plain stores.
//   - "add": duplicate positions must accumulate. Instead of atomics (whose
//     order, and so rounding, would vary between runs), the positions are
//     sorted with a stable sort (M int64, cheap) and the block of the first
//     entry of each run of equal positions adds the run's value rows in their
//     original order, each column owned by one thread; the other blocks exit.
//     Every element therefore sees out = ((h + v_a) + v_b) + ... with the
//     scalar_t rounding of each step, in increasing m: deterministic and
//     identical to the CPU kernel.
// Argument validation (shapes, dtypes, devices, index range) is done by the
// caller before this function runs.

#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace actreplay {
namespace {

template <typename T, int N>
struct alignas(sizeof(T) * N) VecT {
  T v[N];
};

constexpr int kMaxThreads = 256;

// out[positions[m]] = values[m]; one block per m.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
replay_replace_kernel(scalar_t* __restrict__ out, const int64_t* __restrict__ positions,
                      const scalar_t* __restrict__ values, int64_t D) {
  const int64_t m = blockIdx.x;
  scalar_t* dst = out + positions[m] * D;
  const scalar_t* src = values + m * D;
  if constexpr (VEC > 1) {
    using V = VecT<scalar_t, VEC>;
    const int64_t nvec = D / VEC;  // D % VEC == 0 (host check)
    for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x) {
      reinterpret_cast<V*>(dst)[c] = reinterpret_cast<const V*>(src)[c];
    }
  } else {
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dst[d] = src[d];
  }
}

// spos: positions sorted (stable), perm: their original indices. Block i adds
// the run of equal positions that starts at i, in increasing original index.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
replay_add_runs_kernel(scalar_t* __restrict__ out, const int64_t* __restrict__ spos,
                       const int64_t* __restrict__ perm, const scalar_t* __restrict__ values,
                       int64_t M, int64_t D) {
  const int64_t i = blockIdx.x;
  const int64_t p = spos[i];
  if (i > 0 && spos[i - 1] == p) return;  // not the start of a run (block-uniform)
  int64_t end = i + 1;
  while (end < M && spos[end] == p) ++end;
  scalar_t* dst = out + p * D;
  using V = VecT<scalar_t, VEC>;
  const int64_t nvec = D / VEC;  // VEC == 1 or D % VEC == 0 (host check)
  for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x) {
    V acc = reinterpret_cast<const V*>(dst)[c];
    for (int64_t j = i; j < end; ++j) {
      const V x = reinterpret_cast<const V*>(values + perm[j] * D)[c];
#pragma unroll
      for (int q = 0; q < VEC; ++q) acc.v[q] = acc.v[q] + x.v[q];  // scalar_t rounding
    }
    reinterpret_cast<V*>(dst)[c] = acc;
  }
}

int threads_for(int64_t units) {
  return static_cast<int>(
      std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (units + 31) / 32 * 32)));
}

template <typename scalar_t, int VEC>
void launch(at::Tensor& out, const at::Tensor& positions, const at::Tensor& values, bool add,
            int64_t M, int64_t D, cudaStream_t stream) {
  const int threads = threads_for(D / VEC);
  const auto grid = static_cast<unsigned int>(M);
  if (add) {
    const auto sorted = at::sort(positions, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor spos = std::get<0>(sorted).contiguous();
    const at::Tensor perm = std::get<1>(sorted).contiguous();
    replay_add_runs_kernel<scalar_t, VEC><<<grid, threads, 0, stream>>>(
        out.data_ptr<scalar_t>(), spos.data_ptr<int64_t>(), perm.data_ptr<int64_t>(),
        values.data_ptr<scalar_t>(), M, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    replay_replace_kernel<scalar_t, VEC><<<grid, threads, 0, stream>>>(
        out.data_ptr<scalar_t>(), positions.data_ptr<int64_t>(), values.data_ptr<scalar_t>(),
        D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

at::Tensor replay_scatter_cuda(const at::Tensor& hidden, const at::Tensor& positions,
                               const at::Tensor& values, const std::string& mode) {
  c10::cuda::CUDAGuard guard(hidden.device());
  const bool add = (mode == "add");
  TORCH_CHECK(add || mode == "replace", "replay_scatter: unknown mode '", mode,
              "' (expected 'add' or 'replace')");
  at::Tensor out = hidden.clone(at::MemoryFormat::Contiguous);
  const int64_t M = positions.numel();
  const int64_t D = hidden.dim() == 2 ? hidden.size(1) : 0;
  if (M == 0 || D == 0 || out.numel() == 0) return out;
  TORCH_CHECK(M <= static_cast<int64_t>(INT32_MAX), "replay_scatter: too many rows (", M, ")");
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hidden.scalar_type(), "replay_scatter_cuda", [&] {
        constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));
        const bool vec = (D % kVec == 0) &&
                         reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(values.data_ptr()) % 16 == 0;
        if (vec) {
          launch<scalar_t, kVec>(out, positions, values, add, M, D, stream);
        } else {
          launch<scalar_t, 1>(out, positions, values, add, M, D, stream);
        }
      });
  return out;
}

}  // namespace actreplay

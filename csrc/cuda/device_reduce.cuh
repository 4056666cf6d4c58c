// Small device helpers shared by the CUDA kernels (cuda/*.cu): exp/sqrt in
// the accumulation type, and warp and block reductions.
#pragma once

namespace actreplay {

// The float overloads stay in float (expf, sqrtf) instead of going through
// double.
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double acc_sqrt(double x) { return sqrt(x); }

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

// fmax: a NaN operand loses to any number.
struct FmaxOp {
  __device__ __forceinline__ double operator()(double a, double b) const { return fmax(a, b); }
};

// Reduction over the 32 lanes of a full warp; every lane gets the result.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reduction for blocks of kWarps full warps (blockDim.x ==
// 32 * kWarps). All threads of the block must call it (it contains barriers);
// every thread gets the result. `buf` is a shared array of kWarps entries,
// free again when the call returns (the trailing barrier keeps a later write
// from racing the reads of this call). Starts from buf[0], not from an
// identity element: 0 + x would turn a -0.0 sum into +0.0.
template <int kWarps, typename T, typename Op>
__device__ T block_reduce(T v, T* buf, Op op) {
  static_assert(kWarps >= 1 && kWarps <= 32, "a block holds 1 to 32 warps");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_reduce(v, op);
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  T r = buf[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = op(r, buf[w]);
  __syncthreads();
  return r;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  return warp_reduce(v, SumOp{});
}

template <int kWarps, typename T>
__device__ __forceinline__ T block_sum(T v, T* buf) {
  return block_reduce<kWarps>(v, buf, SumOp{});
}

template <int kWarps>
__device__ __forceinline__ double block_max(double v, double* buf) {
  return block_reduce<kWarps>(v, buf, FmaxOp{});
}

}  // namespace actreplay

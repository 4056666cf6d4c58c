// lens_entropy on CUDA: per row n of hidden[N, D], with z = unembed @ xn,
// entropy = lse - sum softmax(z) z, lse = logsumexp z, and the topk largest
// logits (descending, ties by lower vocabulary index) with their indices.
//
// Design (first version: cuBLAS GEMM + streaming reduction; a fused
// tensor-core kernel may replace step b/c later):
//  a. RMSNorm (rms_normalize, torch ops: reference.rms_norm bit for bit):
//     r = 1/sqrt(mean(h^2)+eps) and xn = h r w computed in acc_t (float, or
//     double for double) and rounded to hidden's dtype (the operator's
//     contract), so the GEMM runs bf16/f16 tensor cores with float
//     accumulation; float32 stays float32 (plain at::mm, which obeys torch's
//     allow_tf32 flag, off by default) and float64 stays float64. Without
//     norm_weight xn = hidden (no copy).
//  b. The vocabulary is walked in chunks of vc rows (and, for large N, the
//     rows in chunks of nr): logits = xn[nr] @ unembed[vc].T into a [nr, vc]
//     buffer of type L (float32; float64 for float64 inputs), at most 256 MiB,
//     produced by at::mm with out_dtype=float32 for half/bf16. Vocabulary
//     chunks are at least 16384 wide (rows are chunked first): at N = 4096,
//     V = 152064 that is 16384 (10 chunks), at N = 16384 it is 16384 over row
//     chunks of 4096, not 4096-wide chunks whose per-chunk passes (state,
//     top-k threshold, launch) would dominate; at N <= 2048 it is >= 32768.
//  c. lens_chunk_kernel, one block of 256 threads per row of the chunk, reads
//     each logit once, in tiles of 2048 (8 per thread, coalesced):
//     - softmax statistics: per thread a running max m and s = sum exp(z-m),
//       t = sum exp(z-m)(z-m), all in L (float; a thread sums vc / 256 terms
//       per chunk: 64 at vc = 16384, 594 when one chunk holds V = 152064 at
//       small N; s's terms are positive and t's all <= 0, so there is no
//       cancellation and the relative error stays below ~n u). When
//       the max grows by delta: s' = e^-delta s, t' = e^-delta (t - delta s)
//       (from (z - m') = (z - m) - delta); two states merge the same way after
//       moving both to the larger max. Per tile the thread takes the tile max
//       first, so it rescales at most once per tile, and a warp in which no
//       lane's max grew jumps over the rescale (its branch is not taken by any
//       lane). At the end of the
//       chunk the block merges the thread states in double (shuffles, then
//       shared memory) and thread 0 merges the result into the row's global
//       state [3, N] (double).
//       Final: lse = m + log s, entropy = log s - t/s (no cancellation).
//     - top-k: the row's running list R (the best min(topk, vocab seen so far)
//       (value, index) pairs, sorted best first) lives in global memory,
//       ping-ponged between the output tensors and a scratch pair ([N, topk]
//       each; a per-row byte says which one is current). While R is full, its
//       last entry is a threshold: only logits strictly greater can enter (an
//       equal logit has a larger index, since the vocabulary is walked in
//       increasing order, so it loses the tie); NaN counts as the largest
//       value (as torch.topk), which keeps the order total. Candidates are
//       compacted (warp ballots, one shared atomic per warp) into a
//       shared-memory buffer of 2048 entries. Before a tile's candidates
//       would overflow it, the buffer is flushed: bitonic sort of the buffer
//       (value desc, index asc, padded to a power of two), then a merge-path
//       merge with R into the other ping-pong buffer: each candidate's output
//       position is its rank in the buffer plus a binary search in R, each R
//       entry's is its rank plus a binary search in the buffer; positions
//       >= topk are dropped. The threshold is then re-read and the tile is
//       filtered again (it now fits, as a tile holds at most 2048 entries).
//       Whatever is buffered at the end of the chunk is flushed the same
//       way. This works for any topk <= V: with topk >= 2048 every element
//       is a candidate until R is full, and the buffer flushes once per tile.
//       In the common case (small topk, after the first tile) a tile costs one
//       compare per logit, 8 ballots per warp and one __syncthreads.
//  d. lens_finalize_kernel writes entropy, lse (result dtype) and copies R
//     into the output tensors for the rows whose current buffer is the
//     scratch one.
// Extra memory: [nr, vc] logits buffer (<= 256 MiB) + [3, N] doubles + [N]
// bytes + [N, topk] scratch (values in L, indices int64) + xn [N, D] when
// norm_weight is given.
// Argument validation (shapes, dtypes, devices, 0 <= topk <= V) is done by the
// caller.

#include "ops.h"
#include "cuda/device_reduce.cuh"
#include "rms_norm.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

// at::mm(self, mat2, out_dtype) (aten::mm.dtype, bf16/f16 in -> f32 out on
// CUDA) exists from torch 2.8 on.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define ACTREPLAY_HAS_MM_OUT_DTYPE 1
#else
#define ACTREPLAY_HAS_MM_OUT_DTYPE 0
#endif

namespace actreplay {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 8;                   // logits per thread per tile
constexpr int kTile = kThreads * kItems;    // 2048 logits per tile
constexpr int kCap = 2048;                  // candidate buffer (power of two)
static_assert(kCap >= kTile, "a whole tile must fit in the candidate buffer");
static_assert((kCap & (kCap - 1)) == 0, "bitonic sort needs a power of two");
constexpr int64_t kLogitBufferBytes = int64_t{256} << 20;
constexpr int64_t kMinVocabChunk = 16384;  // a multiple of kTile
constexpr int kFinalizeThreads = 128;

// ---- c. per-chunk reduction -------------------------------------------------

// Softmax state relative to its max m: s = sum e^(z-m), t = sum e^(z-m)(z-m).
// Merges (m2, s2, t2) into (m1, s1, t1). s == 0 marks an empty state, m = NaN
// a state that saw a NaN logit, which absorbs every other.
__device__ __forceinline__ void merge_state(double& m1, double& s1, double& t1, double m2,
                                            double s2, double t2) {
  if (m1 != m1) return;
  if (m2 != m2) {
    m1 = m2;
    s1 = s2;
    t1 = t2;
    return;
  }
  if (s2 == 0.0) return;
  if (s1 == 0.0) {
    m1 = m2;
    s1 = s2;
    t1 = t2;
    return;
  }
  if (m2 > m1) {  // make (m1, s1, t1) the state with the larger max
    const double tm = m1, ts = s1, tt = t1;
    m1 = m2;
    s1 = s2;
    t1 = t2;
    m2 = tm;
    s2 = ts;
    t2 = tt;
  }
  const double dl = m1 - m2;  // >= 0
  const double sc = exp(-dl);
  if (sc == 0.0) return;  // (m2, s2, t2) vanishes against m1 (no 0 * inf from dl * s2)
  s1 += sc * s2;
  t1 += sc * (t2 - dl * s2);
}

// Strict total order of (value, index) pairs, best first: NaN largest, then
// larger value, then lower index.
template <typename L>
__device__ __forceinline__ bool before(L a, int64_t ia, L b, int64_t ib) {
  const bool an = a != a, bn = b != b;
  if (an || bn) return an && (!bn || ia < ib);
  return a > b || (a == b && ia < ib);
}

// Sorts the cnt candidates in (cv, ci) best first and merges them with the
// sorted run (rv, ri)[0, f) into (wv, wi)[0, min(topk, f + cnt)). Must be
// called by all threads of the block with the same arguments; the candidates
// must be visible to all threads (a barrier since they were written). Ends
// with a barrier, so (wv, wi) is visible to the whole block afterwards.
template <typename L>
__device__ void flush_candidates(L* cv, int32_t* ci, int cnt, const L* rv, const int64_t* ri,
                                 int64_t f, L* wv, int64_t* wi, int64_t topk) {
  int P = 1;
  while (P < cnt) P <<= 1;
  for (int x = cnt + threadIdx.x; x < P; x += kThreads) {
    cv[x] = -std::numeric_limits<L>::infinity();
    ci[x] = std::numeric_limits<int32_t>::max();  // after every real entry
  }
  __syncthreads();
  // Bitonic sort of P entries; pair p of stage (k, j) is (lo, lo + j), lo
  // being p with a zero bit inserted at position log2(j).
  for (int k = 2; k <= P; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int p = threadIdx.x; p < (P >> 1); p += kThreads) {
        const int lo = ((p & ~(j - 1)) << 1) | (p & (j - 1));
        const int hi = lo | j;
        const L a = cv[lo], b = cv[hi];
        const int32_t ia = ci[lo], ib = ci[hi];
        const bool best_first = (lo & k) == 0;
        if (best_first ? before(b, ib, a, ia) : before(a, ia, b, ib)) {
          cv[lo] = b;
          cv[hi] = a;
          ci[lo] = ib;
          ci[hi] = ia;
        }
      }
      __syncthreads();
    }
  }
  // Merge: all keys are distinct (distinct indices), so output positions
  // form a permutation of [0, f + cnt); those >= topk are dropped. A
  // candidate at sorted position j >= topk cannot land below topk.
  const int64_t nc = std::min<int64_t>(cnt, topk);
  for (int64_t j = threadIdx.x; j < nc; j += kThreads) {
    const L v = cv[j];
    const int64_t ix = ci[j];
    int64_t lo = 0, hi = f;  // number of R entries before (v, ix)
    while (lo < hi) {
      const int64_t mid = (lo + hi) >> 1;
      if (before(rv[mid], ri[mid], v, ix)) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    const int64_t pos = j + lo;
    if (pos < topk) {
      wv[pos] = v;
      wi[pos] = ix;
    }
  }
  for (int64_t x = threadIdx.x; x < f; x += kThreads) {
    const L v = rv[x];
    const int64_t ix = ri[x];
    int lo = 0, hi = cnt;  // number of candidates before R[x]
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (before(cv[mid], static_cast<int64_t>(ci[mid]), v, ix)) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    const int64_t pos = x + lo;
    if (pos < topk) {
      wv[pos] = v;
      wi[pos] = ix;
    }
  }
  __syncthreads();
}

// One block per row of the chunk logits[nr, vc] (rows r0 + blockIdx.x of the
// full problem, vocabulary entries v0 .. v0 + vc - 1).
template <typename L>
__global__ void __launch_bounds__(kThreads)
lens_chunk_kernel(const L* __restrict__ logits, int64_t vc, int64_t v0, int64_t r0,
                  double* __restrict__ st_m, double* __restrict__ st_s, double* __restrict__ st_t,
                  int64_t topk, L* va, int64_t* ia, L* vb, int64_t* ib,
                  uint8_t* __restrict__ cur_g) {
  __shared__ L s_cv[kCap];
  __shared__ int32_t s_ci[kCap];
  __shared__ int s_ctr[2];
  __shared__ int s_cnt;
  __shared__ double s_red[3 * kWarps];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const unsigned lane_lt = (1u << lane) - 1u;
  const int64_t row = r0 + blockIdx.x;
  const L* z_row = logits + static_cast<int64_t>(blockIdx.x) * vc;
  const L kNegInf = -std::numeric_limits<L>::infinity();

  // Per-thread softmax state (merged in double at the end of the chunk).
  L m = kNegInf;
  L s = L(0), t = L(0);
  bool nan = false;  // a NaN logit seen: the row's lse and entropy are NaN

  // Top-k state; identical in every thread of the block.
  int cur = 0;          // 0: (va, ia) holds R, 1: (vb, ib)
  int64_t f = 0;        // entries in R
  bool full = false;    // f == topk
  L thr = kNegInf;      // R[topk - 1] when full
  if (topk > 0) {
    if (tid == 0) {
      s_ctr[0] = 0;
      s_ctr[1] = 0;
      s_cnt = 0;
    }
    cur = cur_g[row];
    f = std::min<int64_t>(topk, v0);  // R holds the best of the v0 entries seen
    full = (f == topk);
    if (full) thr = (cur ? vb : va)[row * topk + topk - 1];
    __syncthreads();
  }

  int par = 0;
  for (int64_t base = 0; base < vc; base += kTile) {
    const int64_t rem = vc - base;  // valid items: it * kThreads + tid < rem
    L z[kItems];
    L tmax = kNegInf;
#pragma unroll
    for (int it = 0; it < kItems; ++it) {
      const int64_t e = it * kThreads + tid;
      z[it] = e < rem ? z_row[base + e] : kNegInf;
      if (e < rem && z[it] > tmax) tmax = z[it];
      nan |= z[it] != z[it];
    }
    // Softmax statistics (one rescale per tile at most).
    if (tmax > m) {
      if (s != L(0)) {
        const L dl = tmax - m;
        const L sc = acc_exp(-dl);
        if (sc == L(0)) {  // the earlier terms vanish against the new max (no 0 * inf from dl * s)
          s = L(0);
          t = L(0);
        } else {
          t = sc * (t - dl * s);
          s *= sc;
        }
      }
      m = tmax;
      if (m == -kNegInf) {  // a +inf logit: lse = +inf, entropy NaN (as torch); s != 0 keeps the state
        s = L(1);
        t = L(0);
      }
    }
    if (m != -kNegInf && m != kNegInf) {  // +inf: see above; all -inf so far: nothing to add (not NaN)
#pragma unroll
      for (int it = 0; it < kItems; ++it) {
        if (it * kThreads + tid < rem) {
          const L d = z[it] - m;
          const L ex = acc_exp(d);
          if (ex != L(0)) {  // a -inf logit adds nothing, not 0 * -inf
            s += ex;
            t += ex * d;
          }
        }
      }
    }

    if (topk > 0) {
      int* ctr = &s_ctr[par];
      par ^= 1;
      while (true) {
        // Strictly better than R[topk-1] (its index is lower than ours).
        const bool thr_ok = (thr == thr);
        unsigned msk[kItems];
        int wcount = 0;
#pragma unroll
        for (int it = 0; it < kItems; ++it) {
          const bool pred = (it * kThreads + tid < rem) &&
                            (!full || (thr_ok && (z[it] > thr || z[it] != z[it])));
          msk[it] = __ballot_sync(0xffffffffu, pred);
          wcount += __popc(msk[it]);
        }
        int wbase = 0;
        if (wcount > 0) {  // warp-uniform
          if (lane == 0) wbase = atomicAdd(ctr, wcount);
          wbase = __shfl_sync(0xffffffffu, wbase, 0);
        }
        __syncthreads();
        const int total = *ctr;
        const int cnt = s_cnt;
        if (total == 0) break;  // nothing to add: *ctr is still 0
        if (cnt + total <= kCap) {
          int off = cnt + wbase;
#pragma unroll
          for (int it = 0; it < kItems; ++it) {
            if ((msk[it] >> lane) & 1u) {
              const int pos = off + __popc(msk[it] & lane_lt);
              s_cv[pos] = z[it];
              s_ci[pos] = static_cast<int32_t>(v0 + base + it * kThreads + tid);
            }
            off += __popc(msk[it]);
          }
          __syncthreads();
          if (tid == 0) {
            s_cnt = cnt + total;
            *ctr = 0;
          }
          __syncthreads();
          break;
        }
        // The tile does not fit: flush the buffer into R, then filter the
        // tile again against the new threshold.
        __syncthreads();  // everyone has read *ctr and s_cnt
        if (tid == 0) {
          *ctr = 0;
          s_cnt = 0;
        }
        L* rv = (cur ? vb : va) + row * topk;
        int64_t* ri = (cur ? ib : ia) + row * topk;
        L* wv = (cur ? va : vb) + row * topk;
        int64_t* wi = (cur ? ia : ib) + row * topk;
        flush_candidates<L>(s_cv, s_ci, cnt, rv, ri, f, wv, wi, topk);
        cur ^= 1;
        f = std::min<int64_t>(topk, f + cnt);
        full = (f == topk);
        if (full) thr = wv[topk - 1];
      }
    }
  }

  if (topk > 0) {
    const int cnt = s_cnt;  // last written before a barrier
    if (cnt > 0) {
      L* rv = (cur ? vb : va) + row * topk;
      int64_t* ri = (cur ? ib : ia) + row * topk;
      L* wv = (cur ? va : vb) + row * topk;
      int64_t* wi = (cur ? ia : ib) + row * topk;
      flush_candidates<L>(s_cv, s_ci, cnt, rv, ri, f, wv, wi, topk);
      cur ^= 1;
    }
    if (tid == 0) cur_g[row] = static_cast<uint8_t>(cur);
  }

  // Block merge of the softmax states in double, then into the row's global state.
  double md = static_cast<double>(m), sd = static_cast<double>(s), td = static_cast<double>(t);
  if (nan) md = sd = td = static_cast<double>(NAN);  // absorbs every state it meets in merge_state
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const double om = __shfl_xor_sync(0xffffffffu, md, o);
    const double os = __shfl_xor_sync(0xffffffffu, sd, o);
    const double ot = __shfl_xor_sync(0xffffffffu, td, o);
    merge_state(md, sd, td, om, os, ot);
  }
  if (lane == 0) {
    s_red[warp] = md;
    s_red[kWarps + warp] = sd;
    s_red[2 * kWarps + warp] = td;
  }
  __syncthreads();
  if (tid == 0) {
    double bm = st_m[row], bs = st_s[row], bt = st_t[row];
    for (int w = 0; w < kWarps; ++w) {
      merge_state(bm, bs, bt, s_red[w], s_red[kWarps + w], s_red[2 * kWarps + w]);
    }
    st_m[row] = bm;
    st_s[row] = bs;
    st_t[row] = bt;
  }
}

// ---- d. epilogue ------------------------------------------------------------

template <typename L>
__global__ void __launch_bounds__(kFinalizeThreads)
lens_finalize_kernel(const double* __restrict__ st_m, const double* __restrict__ st_s,
                     const double* __restrict__ st_t, L* __restrict__ entropy,
                     L* __restrict__ lse, int64_t topk, const uint8_t* __restrict__ cur_g,
                     L* __restrict__ va, int64_t* __restrict__ ia, const L* __restrict__ vb,
                     const int64_t* __restrict__ ib) {
  const int64_t n = blockIdx.x;
  if (threadIdx.x == 0) {
    const double sn = st_s[n];
    const double ls = log(sn);
    if (isnan(st_m[n])) {  // a NaN logit: lse and entropy NaN
      lse[n] = static_cast<L>(st_m[n]);
      entropy[n] = static_cast<L>(st_m[n]);
    } else if (isinf(st_m[n]) && st_m[n] > 0) {  // a +inf logit: lse = +inf, entropy NaN, as torch has them
      lse[n] = static_cast<L>(st_m[n]);
      entropy[n] = static_cast<L>(nan(""));
    } else {
      lse[n] = static_cast<L>(st_m[n] + ls);
      entropy[n] = static_cast<L>(ls - st_t[n] / sn);
    }
  }
  if (topk > 0 && cur_g[n] != 0) {
    for (int64_t j = threadIdx.x; j < topk; j += kFinalizeThreads) {
      va[n * topk + j] = vb[n * topk + j];
      ia[n * topk + j] = ib[n * topk + j];
    }
  }
}

// ---- host -------------------------------------------------------------------

// logits = x @ u.T as a contiguous [x.size(0), u.size(0)] tensor of type
// opmath(scalar_t): float32 for half/bf16/float32, float64 for float64.
template <typename scalar_t>
at::Tensor chunk_logits(const at::Tensor& x, const at::Tensor& u) {
  if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
#if ACTREPLAY_HAS_MM_OUT_DTYPE
    return at::mm(x, u.t(), at::kFloat).contiguous();
#else
    // Older torch has no half/bf16 -> float32 GEMM entry point. Rounding the
    // logits to bf16 would cost ~3 significant digits, so multiply in float32
    // instead (exact products of the half/bf16 inputs; slower, no tensor cores).
    return at::mm(x.to(at::kFloat), u.t().to(at::kFloat)).contiguous();
#endif
  } else {
    return at::mm(x, u.t()).contiguous();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lens_entropy_cuda(
    const at::Tensor& hidden, const at::Tensor& unembed,
    const c10::optional<at::Tensor>& norm_weight, double eps, int64_t topk) {
  c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t N = hidden.size(0);
  const int64_t D = hidden.size(1);
  const int64_t V = unembed.size(0);
  const auto fopts = hidden.options().dtype(result_dtype(hidden));
  at::Tensor entropy = at::empty({N}, fopts);
  at::Tensor lse = at::empty({N}, fopts);
  at::Tensor topk_logits = at::empty({N, topk}, fopts);
  at::Tensor topk_idx = at::empty({N, topk}, hidden.options().dtype(at::kLong));
  if (N == 0) return {entropy, lse, topk_logits, topk_idx};
  TORCH_CHECK(N <= static_cast<int64_t>(INT32_MAX), "lens_entropy: too many rows (", N, ")");
  TORCH_CHECK(V < static_cast<int64_t>(INT32_MAX), "lens_entropy: vocabulary too large (", V, ")");
  TORCH_CHECK(topk >= 0 && topk <= V, "lens_entropy: topk must be in [0, V]");
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool has_norm = norm_weight.has_value() && norm_weight->defined();

  // [3, N] doubles: running max m, s, t of every row.
  at::Tensor state = at::zeros({3, N}, hidden.options().dtype(at::kDouble));
  state[0].fill_(-std::numeric_limits<double>::infinity());
  at::Tensor scratch_v, scratch_i, cur;
  if (topk > 0) {
    scratch_v = at::empty({N, topk}, fopts);
    scratch_i = at::empty({N, topk}, hidden.options().dtype(at::kLong));
    cur = at::zeros({N}, hidden.options().dtype(at::kByte));
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hidden.scalar_type(), "lens_entropy_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        using L = acc_t;  // logit type: float, or double for double inputs

        // a. normalised rows in hidden's dtype (the contract: rounded to it).
        at::Tensor xn = hidden;
        if (has_norm) {
          xn = rms_normalize(hidden, norm_weight, eps, c10::CppTypeToScalarType<acc_t>::value)
                   .to(hidden.scalar_type());
        }

        double* st_m = state.data_ptr<double>();
        double* st_s = st_m + N;
        double* st_t = st_m + 2 * N;
        L* va = topk > 0 ? topk_logits.data_ptr<L>() : nullptr;
        int64_t* ia = topk > 0 ? topk_idx.data_ptr<int64_t>() : nullptr;
        L* vb = topk > 0 ? scratch_v.data_ptr<L>() : nullptr;
        int64_t* ib = topk > 0 ? scratch_i.data_ptr<int64_t>() : nullptr;
        uint8_t* cur_p = topk > 0 ? cur.data_ptr<uint8_t>() : nullptr;

        // b/c. chunks: nr rows x vc vocabulary entries, nr * vc * sizeof(L)
        // <= 256 MiB; vc a multiple of the tile unless it covers all of V.
        if (V > 0) {
          const int64_t budget = kLogitBufferBytes / static_cast<int64_t>(sizeof(L));
          const int64_t v_min = std::min<int64_t>(V, kMinVocabChunk);
          const int64_t nr_max = std::max<int64_t>(1, std::min<int64_t>(N, budget / v_min));
          int64_t vc_max = std::min<int64_t>(V, budget / nr_max);
          if (vc_max < V) vc_max = std::max<int64_t>(kTile, vc_max / kTile * kTile);
          for (int64_t r0 = 0; r0 < N; r0 += nr_max) {
            const int64_t nr = std::min<int64_t>(nr_max, N - r0);
            const at::Tensor x = xn.narrow(0, r0, nr);
            for (int64_t v0 = 0; v0 < V; v0 += vc_max) {
              const int64_t vc = std::min<int64_t>(vc_max, V - v0);
              const at::Tensor logits = chunk_logits<scalar_t>(x, unembed.narrow(0, v0, vc));
              lens_chunk_kernel<L><<<static_cast<unsigned int>(nr), kThreads, 0, stream>>>(
                  logits.data_ptr<L>(), vc, v0, r0, st_m, st_s, st_t, topk, va, ia, vb, ib,
                  cur_p);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
          }
        }

        // d. epilogue.
        lens_finalize_kernel<L><<<static_cast<unsigned int>(N), kFinalizeThreads, 0, stream>>>(
            st_m, st_s, st_t, entropy.data_ptr<L>(), lse.data_ptr<L>(), topk, cur_p, va, ia, vb,
            ib);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {entropy, lse, topk_logits, topk_idx};
}

}  // namespace actreplay

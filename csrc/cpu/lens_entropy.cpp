// CPU logit-lens reduction: entropy, log-sum-exp and top-k of
// softmax(RMSNorm(h) @ unembed.T) per row, without ever holding [N, V] logits.
//
// The vocabulary is walked in tiles. Each tile's logits [N, Vt] come from one
// matrix product (at::mm, which is multithreaded and vectorised), then every
// row folds its tile into a running state in parallel (at::parallel_for):
//   m = max logit so far, s = sum exp(z - m), t = sum exp(z - m) * (z - m)
// so that lse = m + log s and entropy = log s - t / s with no cancellation
// against m (logits of magnitude 1e4 keep full precision). The top-k of each
// row is a bounded min-heap ordered by (value desc, index asc).
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "cpu/fast_math.h"
#include "rms_norm.h"

namespace actreplay {
namespace {

// Upper bound on the logits tile [rows, Vt] in elements (16 MiB of float32).
constexpr int64_t kTileElements = int64_t(1) << 22;

template <typename acc_t>
struct RowState {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  acc_t s = 0;
  acc_t t = 0;
  bool nan = false;  // a NaN logit: lse and entropy are NaN (a max or a sum would drop it)
};

// Heap entry order: `a` is worse than `b` if it has a smaller value, or the same
// value and a larger index; NaN is the largest value (as torch.topk), which keeps
// the order total. std::push_heap with this keeps the worst on top.
template <typename acc_t>
struct WorseFirst {
  bool operator()(const std::pair<acc_t, int64_t>& a, const std::pair<acc_t, int64_t>& b) const {
    // "a before b in heap order" == a is better than b, so the top is the worst.
    const bool an = a.first != a.first, bn = b.first != b.first;
    if (an || bn) return an && (!bn || a.second < b.second);
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  }
};

template <typename acc_t>
void fold_tile(const acc_t* z, int64_t n, int64_t v0, RowState<acc_t>& st, int64_t topk,
               std::pair<acc_t, int64_t>* heap, int64_t& heap_size) {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  acc_t tile_max = -kInf;
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) {
    tile_max = std::max(tile_max, z[j]);
    nan |= z[j] != z[j];
  }
  st.nan |= nan;
  if (tile_max > st.m) {
    if (st.s > 0) {
      // Shift the reference point from m to tile_max: every (z - m) drops by d.
      const acc_t d = tile_max - st.m;
      const acc_t scale = std::exp(-d);
      if (scale == 0) {  // the earlier terms vanish against the new max (no 0 * inf from d * s)
        st.t = 0;
        st.s = 0;
      } else {
        st.t = scale * (st.t - d * st.s);
        st.s = scale * st.s;
      }
    }
    st.m = tile_max;
  }
  // With a +inf logit, lse = +inf and the entropy is NaN, as torch has them; with
  // only -inf so far there is nothing to add (and -inf - -inf would be NaN).
  if (std::isfinite(st.m)) {
    acc_t s = 0, t = 0;
    sum_exp_shifted(z, n, st.m, &s, &t);
    st.s += s;
    st.t += t;
  }

  if (topk == 0) return;
  WorseFirst<acc_t> cmp;
  int64_t j = 0;
  for (; j < n && heap_size < topk; ++j) {  // fill the heap first
    heap[heap_size++] = {z[j], v0 + j};
    std::push_heap(heap, heap + heap_size, cmp);
  }
  // Indices only grow across the walk, so a later equal value never beats an
  // entry already held: only strictly larger values enter, and a NaN unless the
  // threshold is NaN too.
  acc_t threshold = heap_size ? heap[0].first : std::numeric_limits<acc_t>::infinity();
  for (; j < n; ++j) {
    if (z[j] > threshold || (z[j] != z[j] && threshold == threshold)) {
      std::pop_heap(heap, heap + heap_size, cmp);
      heap[heap_size - 1] = {z[j], v0 + j};
      std::push_heap(heap, heap + heap_size, cmp);
      threshold = heap[0].first;
    }
  }
}

template <typename scalar_t>
void lens_entropy_kernel(const at::Tensor& hidden, const at::Tensor& unembed,
                         const c10::optional<at::Tensor>& norm_weight, double eps, int64_t topk,
                         at::Tensor& entropy, at::Tensor& lse, at::Tensor& topk_logits,
                         at::Tensor& topk_idx) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t N = hidden.size(0), V = unembed.size(0);

  at::Tensor xn = rms_normalize(hidden, norm_weight, eps, acc_dtype);  // [N, D] acc_t
  // The lens contract for half/bf16 (as CUDA, whose GEMM reads it so, and as the
  // model's own RMSNorm returns it): xn rounded to the input dtype, products
  // and sums in float32.
  if (!std::is_same_v<scalar_t, acc_t>) xn = xn.to(hidden.scalar_type()).to(acc_dtype);

  const int64_t row_block = std::min<int64_t>(N, std::max<int64_t>(1, kTileElements / 256));
  const int64_t vt = std::clamp<int64_t>(kTileElements / std::max<int64_t>(row_block, 1), 256, 8192);

  std::vector<RowState<acc_t>> state(N);
  std::vector<std::pair<acc_t, int64_t>> heaps(static_cast<size_t>(N * topk));
  std::vector<int64_t> heap_sizes(N, 0);

  for (int64_t v0 = 0; v0 < V; v0 += vt) {
    const int64_t nv = std::min(vt, V - v0);
    // The tile of the unembedding in the accumulation dtype: Vt x D, bounded.
    const at::Tensor w_tile = unembed.narrow(0, v0, nv).to(acc_dtype);
    for (int64_t r0 = 0; r0 < N; r0 += row_block) {
      const int64_t nr = std::min(row_block, N - r0);
      const at::Tensor logits = at::mm(xn.narrow(0, r0, nr), w_tile.t()).contiguous();
      const acc_t* lz = logits.data_ptr<acc_t>();
      at::parallel_for(0, nr, 8, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const int64_t row = r0 + r;
          fold_tile<acc_t>(lz + r * nv, nv, v0, state[row], topk, heaps.data() + row * topk,
                           heap_sizes[row]);
        }
      });
    }
  }

  auto* ent = entropy.data_ptr<acc_t>();
  auto* ls = lse.data_ptr<acc_t>();
  auto* tv = topk > 0 ? topk_logits.data_ptr<acc_t>() : nullptr;
  auto* ti = topk > 0 ? topk_idx.data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, N, 64, [&](int64_t b, int64_t e) {
    WorseFirst<acc_t> cmp;
    for (int64_t row = b; row < e; ++row) {
      const auto& st = state[row];
      if (st.nan) {
        ls[row] = std::numeric_limits<acc_t>::quiet_NaN();
        ent[row] = ls[row];
      } else if (st.m == std::numeric_limits<acc_t>::infinity()) {
        ls[row] = st.m;
        ent[row] = std::numeric_limits<acc_t>::quiet_NaN();
      } else {
        ls[row] = st.m + std::log(st.s);
        ent[row] = std::log(st.s) - st.t / st.s;
      }
      if (topk > 0) {
        auto* h = heaps.data() + row * topk;
        std::sort_heap(h, h + heap_sizes[row], cmp);  // best first under WorseFirst
        for (int64_t j = 0; j < topk; ++j) {
          tv[row * topk + j] = h[j].first;
          ti[row * topk + j] = h[j].second;
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lens_entropy_cpu(
    const at::Tensor& hidden, const at::Tensor& unembed,
    const c10::optional<at::Tensor>& norm_weight, double eps, int64_t topk) {
  const int64_t N = hidden.size(0);
  const auto out_opts = hidden.options().dtype(result_dtype(hidden));
  at::Tensor entropy = at::empty({N}, out_opts);
  at::Tensor lse = at::empty({N}, out_opts);
  at::Tensor topk_logits = at::empty({N, topk}, out_opts);
  at::Tensor topk_idx = at::empty({N, topk}, hidden.options().dtype(at::kLong));
  if (N == 0) return {entropy, lse, topk_logits, topk_idx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(),
                                  "actreplay_lens_entropy_cpu", [&] {
                                    lens_entropy_kernel<scalar_t>(hidden, unembed, norm_weight,
                                                                  eps, topk, entropy, lse,
                                                                  topk_logits, topk_idx);
                                  });
  return {entropy, lse, topk_logits, topk_idx};
}

}  // namespace actreplay

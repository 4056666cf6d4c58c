// CPU token selection (SPEC §3-4): per layer row, the candidates whose entropy
// passes the rule ("ratio", "topk", "absolute"), from the low end, or as many
// from the high end ("high"). Order ties by lower index. Rows run in parallel.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"

namespace actreplay {
namespace {

// How many candidates a count-based rule picks: an integer count, or a
// fraction of the candidates (floor), capped at the number of candidates.
int64_t count_for(double value, int64_t n_cand) {
  // Clamp in double before the cast, as the CUDA kernel does: a count >= 2^63 does
  // not fit int64 (undefined behaviour); NaN and counts <= 0 pick nothing.
  const double c = value >= 1.0 ? std::floor(value) : std::floor(value * static_cast<double>(n_cand));
  if (c >= static_cast<double>(n_cand)) return n_cand;
  return c > 0.0 ? static_cast<int64_t>(c) : 0;
}

template <typename T>
void select_row(const T* E, const bool* cand, int64_t N, const std::string& rule, double value,
                bool high, bool* out, std::vector<int64_t>& idx) {
  idx.clear();
  for (int64_t i = 0; i < N; ++i)
    if (cand[i]) idx.push_back(i);
  std::fill(out, out + N, false);
  if (idx.empty()) return;

  int64_t count = 0;
  if (rule == "ratio") {
    T emax = E[idx[0]];
    for (int64_t i : idx) emax = std::max(emax, E[i]);
    const T thr = static_cast<T>(value) * emax;
    for (int64_t i : idx) count += (E[i] <= thr);
    if (!high) {
      for (int64_t i : idx) out[i] = E[i] <= thr;
      return;
    }
  } else if (rule == "absolute") {
    const T thr = static_cast<T>(value);
    for (int64_t i : idx) count += (E[i] < thr);
    if (!high) {
      for (int64_t i : idx) out[i] = E[i] < thr;
      return;
    }
  } else {  // topk
    count = count_for(value, static_cast<int64_t>(idx.size()));
  }
  if (count == 0) return;
  // The `count` lowest (or highest) entropies, ties broken by lower index.
  auto before = [&](int64_t a, int64_t b) {
    if (E[a] != E[b]) return high ? E[a] > E[b] : E[a] < E[b];
    return a < b;
  };
  std::nth_element(idx.begin(), idx.begin() + (count - 1), idx.end(), before);
  for (int64_t j = 0; j < count; ++j) out[idx[j]] = true;
}

}  // namespace

at::Tensor select_tokens_cpu(const at::Tensor& entropy, const at::Tensor& candidates,
                             const std::string& rule, at::ArrayRef<double> value,
                             const std::string& side) {
  const int64_t L = entropy.size(0), N = entropy.size(1);
  at::Tensor mask = at::zeros({L, N}, entropy.options().dtype(at::kBool));
  if (L == 0 || N == 0) return mask;
  const bool high = side == "high";
  const bool* cand = candidates.data_ptr<bool>();
  bool* out = mask.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(entropy.scalar_type(), "actreplay_select_tokens_cpu", [&] {
    const scalar_t* E = entropy.data_ptr<scalar_t>();
    at::parallel_for(0, L, 1, [&](int64_t b, int64_t e) {
      std::vector<int64_t> idx;
      idx.reserve(N);
      for (int64_t l = b; l < e; ++l) {
        const double v = value.size() == 1 ? value[0] : value[l];
        select_row<scalar_t>(E + l * N, cand, N, rule, v, high, out + l * N, idx);
      }
    });
  });
  return mask;
}

}  // namespace actreplay

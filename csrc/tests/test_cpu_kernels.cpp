// C++ tests of the CPU kernels against naive double-precision loops, and of the
// argument validation. Built and run by CMake/ctest (also under ASan+UBSan).
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "ops.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    ++failures;
  }
}

bool throws(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
  } catch (const c10::Error& e) {
    return std::string(e.what()).find(needle) != std::string::npos;
  }
  return false;
}

double max_rel(const at::Tensor& a, const at::Tensor& b) {
  auto a64 = a.to(at::kDouble), b64 = b.to(at::kDouble);
  return ((a64 - b64).norm() / b64.norm().clamp_min(1e-30)).item<double>();
}

// Naive lens in double: logits of every vocab row.
std::vector<double> naive_logits(const at::Tensor& h, const at::Tensor& U, const at::Tensor& w,
                                 int64_t row, double eps) {
  const int64_t D = h.size(1), V = U.size(0);
  auto hd = h.to(at::kDouble), Ud = U.to(at::kDouble), wd = w.to(at::kDouble);
  auto ha = hd.accessor<double, 2>();
  auto Ua = Ud.accessor<double, 2>();
  auto wa = wd.accessor<double, 1>();
  double ss = 0;
  for (int64_t d = 0; d < D; ++d) ss += ha[row][d] * ha[row][d];
  const double r = 1.0 / std::sqrt(ss / D + eps);
  std::vector<double> z(V, 0.0);
  for (int64_t v = 0; v < V; ++v)
    for (int64_t d = 0; d < D; ++d) z[v] += ha[row][d] * r * wa[d] * Ua[v][d];
  return z;
}

void test_lens_entropy() {
  at::manual_seed(0);
  const int64_t N = 5, V = 1003, D = 24, K = 7;
  auto h = at::randn({N, D});
  auto U = at::randn({V, D});
  auto w = at::rand({D}) + 0.5;
  auto [ent, lse, tv, ti] = actreplay::lens_entropy_cpu(h, U, w, 1e-6, K);
  for (int64_t n = 0; n < N; ++n) {
    auto z = naive_logits(h, U, w, n, 1e-6);
    double m = -INFINITY;
    for (double x : z) m = std::max(m, x);
    double s = 0, t = 0;
    for (double x : z) {
      s += std::exp(x - m);
      t += std::exp(x - m) * (x - m);
    }
    const double ref_lse = m + std::log(s), ref_ent = std::log(s) - t / s;
    expect(std::abs(lse[n].item<double>() - ref_lse) <= 1e-5 * std::abs(ref_lse), "lse row");
    expect(std::abs(ent[n].item<double>() - ref_ent) <= 1e-5 * std::abs(ref_ent), "entropy row");
    std::vector<int64_t> order(V);
    for (int64_t v = 0; v < V; ++v) order[v] = v;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return z[a] > z[b]; });
    for (int64_t j = 0; j < K; ++j)
      expect(ti[n][j].item<int64_t>() == order[j], "top-k index");
  }
  expect(throws([&] { actreplay::validate_lens_entropy(h, U, w, 1e-6, V + 1); }, "'topk'"),
         "topk > V rejected");
}

void test_topk_kl() {
  at::manual_seed(1);
  const int64_t M = 6, V = 300, D = 16, K = 9;
  auto h = at::randn({M, D}, at::kDouble);
  auto U = at::randn({V, D}, at::kDouble);
  auto w = at::rand({D}, at::kDouble) + 0.5;
  auto idx = at::randint(0, V, {M, K}, at::kLong);
  auto lp = at::log_softmax(at::randn({M, K}, at::kDouble), 1);
  auto kl = actreplay::topk_kl_cpu(h, U, w, 1e-6, idx, lp);
  for (int64_t i = 0; i < M; ++i) {
    auto z = naive_logits(h, U, w, i, 1e-6);
    std::vector<double> g(K);
    double m = -INFINITY;
    for (int64_t j = 0; j < K; ++j) m = std::max(m, g[j] = z[idx[i][j].item<int64_t>()]);
    double s = 0;
    for (double x : g) s += std::exp(x - m);
    double ref = 0;
    for (int64_t j = 0; j < K; ++j) {
      const double l = lp[i][j].item<double>();
      ref += std::exp(l) * (l - (g[j] - m - std::log(s)));
    }
    expect(std::abs(kl[i].item<double>() - ref) <= 1e-10 * std::max(1.0, std::abs(ref)),
           "topk_kl row");
  }
  // Backward against central differences.
  auto grad = actreplay::topk_kl_backward_cpu(at::ones({M}, at::kDouble), h, U, w, 1e-6, idx, lp);
  const double step = 1e-6;
  for (int64_t d = 0; d < D; d += 5) {
    auto hp = h.clone(), hm = h.clone();
    hp[2][d] += step;
    hm[2][d] -= step;
    const double fd = (actreplay::topk_kl_cpu(hp, U, w, 1e-6, idx, lp)[2].item<double>() -
                       actreplay::topk_kl_cpu(hm, U, w, 1e-6, idx, lp)[2].item<double>()) /
                      (2 * step);
    expect(std::abs(grad[2][d].item<double>() - fd) <= 1e-6, "topk_kl gradient");
  }
}

void test_replay_scatter() {
  auto h = at::zeros({5, 3});
  auto pos = at::tensor({4, 1, 4}, at::kLong);
  auto vals = at::ones({3, 3});
  auto out = actreplay::replay_scatter_cpu(h, pos, vals, "add");
  expect(out[4][0].item<float>() == 2.f && out[1][2].item<float>() == 1.f &&
             out[0][0].item<float>() == 0.f,
         "replay_scatter add with duplicates");
  auto rep = actreplay::replay_scatter_cpu(at::ones({5, 3}), at::tensor({2}, at::kLong),
                                           at::full({1, 3}, 7.f), "replace");
  expect(rep[2][1].item<float>() == 7.f && rep[3][1].item<float>() == 1.f, "replace");
  expect(throws([&] {
           actreplay::validate_replay_scatter(h, at::tensor({1, 1}, at::kLong), at::ones({2, 3}),
                                              "replace");
         }, "unique"),
         "duplicate positions rejected for replace");
  expect(throws([&] { actreplay::validate_replay_scatter(h, pos, at::ones({2, 3}), "add"); },
                "same length"),
         "length mismatch rejected");
}

void test_select_tokens() {
  auto ent = at::tensor({0.1, 0.5, 0.2, 1.0, 0.1, 0.9}, at::kFloat).view({1, 6});
  auto cand = at::tensor({1, 1, 1, 1, 1, 0}, at::kInt).to(at::kBool);
  std::vector<double> ratio{0.4}, two{2};
  auto low = actreplay::select_tokens_cpu(ent, cand, "ratio", ratio, "low");
  auto high = actreplay::select_tokens_cpu(ent, cand, "ratio", ratio, "high");
  auto top2 = actreplay::select_tokens_cpu(ent, cand, "topk", two, "low");
  const bool low_ok[6] = {true, false, true, false, true, false};
  const bool high_ok[6] = {false, true, true, true, false, false};
  const bool top2_ok[6] = {true, false, false, false, true, false};
  for (int i = 0; i < 6; ++i) {
    expect(low[0][i].item<bool>() == low_ok[i], "ratio low");
    expect(high[0][i].item<bool>() == high_ok[i], "ratio high");
    expect(top2[0][i].item<bool>() == top2_ok[i], "topk low");
  }
}

}  // namespace

int main() {
  test_lens_entropy();
  test_topk_kl();
  test_replay_scatter();
  test_select_tokens();
  if (failures) {
    std::fprintf(stderr, "%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all CPU kernel tests passed\n");
  return 0;
}

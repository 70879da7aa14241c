// C++ unit tests: the CPU Top-k select (csrc/cpu/topk_select.h) against a std::sort reference,
// and the ef21 operators called through the dispatcher, as the hook calls them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/topk_select.h"
#include "hook/ef21_hook.h"
#include "hook/randk.h"

namespace {

// Reference: order by (|x| descending, index ascending) with a full sort, keep the first k and
// return them ascending. Ties go to the lower index by construction.
template <typename T>
std::vector<int32_t> reference_topk(const std::vector<T>& x, int64_t k) {
  std::vector<int32_t> order(x.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    const T fa = std::abs(x[a]), fb = std::abs(x[b]);
    return fa != fb ? fa > fb : a < b;
  });
  order.resize(k);
  std::sort(order.begin(), order.end());
  return order;
}

template <typename T>
std::vector<int32_t> select(const std::vector<T>& x, int64_t k) {
  std::vector<int32_t> out(k, -1);
  ef21::cpu::select_topk_abs<T>(static_cast<int64_t>(x.size()), k, [&](int64_t i) { return x[i]; }, out.data());
  return out;
}

template <typename T>
std::vector<T> normal(int64_t d, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist;
  std::vector<T> x(d);
  for (auto& v : x) v = static_cast<T>(dist(gen));
  return x;
}

std::vector<float> integers(int64_t d, int lo, int hi, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> dist(lo, hi);
  std::vector<float> x(d);
  for (auto& v : x) v = static_cast<float>(dist(gen));
  return x;
}

// Restores the intra-op thread count whatever a test sets.
struct ThreadGuard {
  int saved = at::get_num_threads();
  ~ThreadGuard() { at::set_num_threads(saved); }
};

TEST(TopkSelect, MatchesSortReferenceOnRandomData) {
  for (int64_t d : {1, 2, 3, 100, 1000, 100003}) {
    const auto x = normal<float>(d, static_cast<unsigned>(d));
    for (int64_t k : {int64_t(1), std::max<int64_t>(1, d / 10), std::max<int64_t>(1, d - 1), d}) {
      EXPECT_EQ(select(x, k), reference_topk(x, k)) << "d=" << d << " k=" << k;
    }
  }
}

TEST(TopkSelect, Double) {
  const auto x = normal<double>(50000, 7);
  for (int64_t k : {1, 10, 4999, 50000}) EXPECT_EQ(select(x, k), reference_topk(x, k)) << "k=" << k;
}

TEST(TopkSelect, TiesGoToTheLowerIndex) {
  // Integer-valued data: thousands of equal |x| at the threshold, across chunks.
  const auto x = integers(100003, -5, 5, 1);
  for (int64_t k : {1, 2, 7, 9000, 50000, 100002}) EXPECT_EQ(select(x, k), reference_topk(x, k)) << "k=" << k;

  const std::vector<float> equal(1000, -2.5f);  // all equal: the first k indices
  for (int64_t k : {1, 10, 999}) {
    std::vector<int32_t> first(k);
    std::iota(first.begin(), first.end(), 0);
    EXPECT_EQ(select(equal, k), first);
  }
  const std::vector<float> signs{3.f, -3.f, 1.f, -3.f, 3.f};  // +3 and -3 tie on |x|
  EXPECT_EQ(select(signs, 2), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(select(signs, 3), (std::vector<int32_t>{0, 1, 3}));
  const std::vector<float> zeros{0.f, -0.f, 0.f};  // and so do +0 and -0
  EXPECT_EQ(select(zeros, 2), (std::vector<int32_t>{0, 1}));
}

TEST(TopkSelect, KEqualsOneAndKEqualsD) {
  const std::vector<float> x{0.5f, -7.f, 2.f, 7.f};
  EXPECT_EQ(select(x, 1), (std::vector<int32_t>{1}));
  EXPECT_EQ(select(x, 4), (std::vector<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(select(std::vector<float>{-1.f}, 1), (std::vector<int32_t>{0}));
}

TEST(TopkSelect, SameResultForAnyThreadCount) {
  ThreadGuard guard;
  const auto x = integers(300007, -40, 40, 2);
  const int64_t k = 12345;
  at::set_num_threads(1);
  const auto one = select(x, k);
  EXPECT_EQ(one, reference_topk(x, k));
  for (int threads : {2, 3, 4}) {
    at::set_num_threads(threads);
    EXPECT_EQ(select(x, k), one) << threads << " threads";
  }
}

// --- the operators, through the dispatcher ----------------------------------------------------

std::tuple<at::Tensor, at::Tensor> topk_abs(const at::Tensor& x, int64_t k) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ef21::topk_abs", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>();
  return op.call(x, k);
}

at::Tensor compress(const at::Tensor& grad, const std::optional<at::Tensor>& state,
                    const std::optional<at::Tensor>& aux, const std::string& algorithm, int64_t k, double momentum,
                    const std::optional<at::Tensor>& indices, at::ScalarType value_dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ef21::compress_", "")
                       .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, c10::string_view, int64_t, double,
                                         const std::optional<at::Tensor>&, at::ScalarType, bool)>();
  return op.call(grad, state, aux, algorithm, k, momentum, indices, value_dtype, /*update_state=*/true);
}

at::Tensor& aggregate(at::Tensor& out, const at::Tensor& messages, int64_t k, at::ScalarType value_dtype,
                      double scale, const std::optional<at::Tensor>& indices) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ef21::aggregate_", "")
                       .typed<at::Tensor&(at::Tensor&, const at::Tensor&, int64_t, at::ScalarType, double,
                                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  return op.call(out, messages, k, value_dtype, scale, indices, /*ok=*/std::nullopt);
}

// The reference selection on a tensor: a stable descending sort of |x|.
at::Tensor reference_indices(const at::Tensor& x, int64_t k) {
  auto order = std::get<1>(at::sort(x.abs().to(at::kDouble), /*stable=*/true, /*dim=*/0, /*descending=*/true));
  return std::get<0>(at::sort(order.slice(0, 0, k)));
}

// Packs [k int32 | k values] as compress_ does, for hand-made messages.
at::Tensor pack(const std::vector<int32_t>& idx, const std::vector<float>& values) {
  const int64_t k = static_cast<int64_t>(idx.size());
  at::Tensor msg = at::empty({k * 8}, at::kByte);
  std::memcpy(msg.data_ptr<uint8_t>(), idx.data(), 4 * k);
  std::memcpy(msg.data_ptr<uint8_t>() + 4 * k, values.data(), 4 * k);
  return msg;
}

// Runs f and returns the message of the c10::Error it throws ("" if none).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

TEST(Ops, TopkAbsMatchesReference) {
  at::manual_seed(0);
  for (auto dtype : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
    const at::Tensor x = at::randn({5000}, at::kDouble).to(dtype);
    for (int64_t k : {1, 50, 5000}) {
      auto [idx, values] = topk_abs(x, k);
      ASSERT_EQ(idx.scalar_type(), at::kInt);
      const at::Tensor expect = reference_indices(x, k);
      EXPECT_TRUE(at::equal(idx.to(at::kLong), expect)) << dtype << " k=" << k;
      EXPECT_TRUE(at::equal(values, x.index_select(0, expect))) << dtype << " k=" << k;
    }
  }
}

TEST(Ops, CompressEf21UpdatesStateWithWhatItSends) {
  at::manual_seed(1);
  const int64_t d = 4000, k = 40;
  const at::Tensor grad = at::randn({d});
  at::Tensor state = at::randn({d});
  const at::Tensor before = state.clone();
  const at::Tensor msg = compress(grad, state, std::nullopt, "ef21", k, 0.0, std::nullopt, at::kBFloat16);
  ASSERT_EQ(msg.numel(), k * (4 + 2));
  const at::Tensor idx = msg.slice(0, 0, 4 * k).view(at::kInt).to(at::kLong);
  const at::Tensor values = msg.slice(0, 4 * k).view(at::kBFloat16);
  const at::Tensor p = grad - before;
  EXPECT_TRUE(at::equal(idx, reference_indices(p, k)));
  const at::Tensor sent = p.index_select(0, idx).to(at::kBFloat16);
  EXPECT_TRUE(at::equal(values, sent));
  // g_i += c with c the rounded value; unchanged elsewhere.
  at::Tensor expect = before.clone();
  expect.index_add_(0, idx, sent.to(at::kFloat));
  EXPECT_TRUE(at::equal(state, expect));
}

TEST(Ops, CompressWithGivenIndicesSendsValuesOnly) {
  const int64_t d = 1000, k = 25;
  const at::Tensor grad = at::randn({d});
  at::Tensor e = at::zeros({d});
  const at::Tensor indices = ef21::randk_indices(d, k, 99);
  const at::Tensor msg = compress(grad, e, std::nullopt, "ef", k, 0.0, indices, at::kFloat);
  ASSERT_EQ(msg.scalar_type(), at::kFloat);
  ASSERT_EQ(msg.numel(), k);
  EXPECT_TRUE(at::equal(msg, grad.index_select(0, indices.to(at::kLong))));
  // e = p - c: zero where sent, the gradient elsewhere.
  at::Tensor expect = grad.clone();
  expect.index_fill_(0, indices.to(at::kLong), 0.0);
  EXPECT_TRUE(at::equal(e, expect));
}

TEST(Ops, AggregateAppliesRowsInOrder) {
  // In float32, 1e8 + 1 == 1e8: the row order decides the result, and must be respected.
  at::Tensor out = at::zeros({3});
  const at::Tensor rows = at::stack({pack({0, 2}, {1e8f, 1.f}), pack({0, 1}, {-1e8f, 2.f}), pack({0, 2}, {1.f, 3.f})});
  aggregate(out, rows, 2, at::kFloat, 1.0, std::nullopt);
  EXPECT_EQ(out[0].item<float>(), 1.f);
  EXPECT_EQ(out[1].item<float>(), 2.f);
  EXPECT_EQ(out[2].item<float>(), 4.f);

  // Against sequential index_add_ in row order, bitwise, on random overlapping messages.
  at::manual_seed(2);
  const int64_t d = 5000, k = 1001, n = 6;  // odd k: unaligned rows for 2-byte values
  std::vector<at::Tensor> msgs;
  at::Tensor target = at::randn({d}), expect = target.clone();
  for (int64_t r = 0; r < n; ++r) {
    const at::Tensor g = at::randn({d});
    msgs.push_back(compress(g, std::nullopt, std::nullopt, "plain", k, 0.0, std::nullopt, at::kHalf));
    const at::Tensor idx = reference_indices(g, k);
    expect.index_add_(0, idx, g.index_select(0, idx).to(at::kHalf).to(at::kFloat) * 0.25f);
  }
  aggregate(target, at::stack(msgs), k, at::kHalf, 0.25, std::nullopt);
  EXPECT_TRUE(at::equal(target, expect));
}

TEST(Ops, SameResultForAnyThreadCount) {
  ThreadGuard guard;
  at::manual_seed(3);
  const int64_t d = 200003, k = 2001;
  const at::Tensor grad = at::randint(-20, 21, {d}).to(at::kFloat);
  const at::Tensor state0 = at::randint(-20, 21, {d}).to(at::kFloat) / 3;
  std::vector<at::Tensor> results;
  for (int threads : {1, 2, 3}) {
    at::set_num_threads(threads);
    at::Tensor state = state0.clone();
    const at::Tensor msg = compress(grad, state, std::nullopt, "ef21", k, 0.0, std::nullopt, at::kFloat);
    at::Tensor out = state0.clone();
    aggregate(out, at::stack({msg, msg, msg}), k, at::kFloat, 1.0 / 3, std::nullopt);
    if (results.empty()) {
      results = {msg, state, out};
    } else {
      EXPECT_TRUE(at::equal(msg, results[0])) << threads << " threads";
      EXPECT_TRUE(at::equal(state, results[1])) << threads << " threads";
      EXPECT_TRUE(at::equal(out, results[2])) << threads << " threads";
    }
  }
}

TEST(Ops, ClearErrorsOnBadInput) {
  const at::Tensor x = at::randn({10});
  EXPECT_NE(error_of([&] { topk_abs(x.view({2, 5}), 1); }).find("x must be 1-D, got 2-D"), std::string::npos);
  EXPECT_NE(error_of([&] { topk_abs(x, 0); }).find("k=0 is out of range; allowed: 1 <= k <= 10"), std::string::npos);
  EXPECT_NE(error_of([&] { topk_abs(x, 11); }).find("k=11 is out of range"), std::string::npos);
  EXPECT_NE(error_of([&] { topk_abs(at::arange(10), 1); }).find("x must be floating point"), std::string::npos);

  at::Tensor state = at::zeros({10});
  EXPECT_NE(error_of([&] { compress(x, std::nullopt, std::nullopt, "ef21", 2, 0.1, std::nullopt, at::kFloat); })
                .find("needs a state tensor"),
            std::string::npos);
  EXPECT_NE(error_of([&] { compress(x, state, std::nullopt, "topk", 2, 0.1, std::nullopt, at::kFloat); })
                .find("algorithm='topk' is not supported"),
            std::string::npos);
  const at::Tensor unsorted = at::tensor({5, 2}, at::kInt);
  EXPECT_NE(error_of([&] { compress(x, state, std::nullopt, "ef21", 2, 0.1, unsorted, at::kFloat); })
                .find("strictly ascending"),
            std::string::npos);
  EXPECT_TRUE(at::equal(state, at::zeros({10})));  // refused before writing anything

  at::Tensor out = at::zeros({10});
  const at::Tensor bad = at::stack({pack({3, 3}, {1.f, 1.f})});
  EXPECT_NE(error_of([&] { aggregate(out, bad, 2, at::kFloat, 1.0, std::nullopt); }).find("not strictly ascending"),
            std::string::npos);
  const at::Tensor outside = at::stack({pack({1, 10}, {1.f, 1.f})});
  EXPECT_NE(error_of([&] { aggregate(out, outside, 2, at::kFloat, 1.0, std::nullopt); }).find("[0, 10)"),
            std::string::npos);
  EXPECT_TRUE(at::equal(out, at::zeros({10})));
}

// --- helpers shared with the hook ---------------------------------------------------------------

TEST(Helpers, KFor) {
  EXPECT_EQ(ef21::k_for(123, 4.0 / 123, 0), 4);
  EXPECT_EQ(ef21::k_for(123, 1.0, 0), 123);
  EXPECT_EQ(ef21::k_for(1000, 1e-9, 0), 1);
  EXPECT_EQ(ef21::k_for(1000, 0.5, 7), 7);
  EXPECT_EQ(ef21::k_for(10, 0.5, 50), 10);
  for (int64_t d = 1; d <= 300; ++d)
    for (int64_t k = 1; k <= d; ++k) ASSERT_EQ(ef21::k_for(d, static_cast<double>(k) / d, 0), k) << d << " " << k;
}

TEST(Helpers, RandkIndices) {
  for (int64_t k : {1, 10, 500, 1000}) {
    const at::Tensor a = ef21::randk_indices(1000, k, 5);
    ASSERT_EQ(a.numel(), k);
    const int32_t* p = a.data_ptr<int32_t>();
    EXPECT_GE(p[0], 0);
    EXPECT_LT(p[k - 1], 1000);
    for (int64_t j = 1; j < k; ++j) EXPECT_LT(p[j - 1], p[j]);
    EXPECT_TRUE(at::equal(a, ef21::randk_indices(1000, k, 5)));  // a function of the seed alone
  }
  EXPECT_FALSE(at::equal(ef21::randk_indices(1000, 10, 1), ef21::randk_indices(1000, 10, 2)));
  EXPECT_TRUE(at::equal(ef21::randk_indices(7, 7, 3), at::arange(7, at::kInt)));
}

}  // namespace

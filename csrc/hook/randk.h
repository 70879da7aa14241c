// Rand-k support drawn from a seed alone (splitmix64 + Floyd's sampling), so every rank and every
// device derives the same indices without communicating them.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <unordered_set>
#include <vector>

namespace ef21 {

inline uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// k distinct indices in [0, d), ascending, int32, on the CPU.
inline at::Tensor randk_indices(int64_t d, int64_t k, uint64_t seed) {
  TORCH_CHECK(k >= 1 && k <= d, "k=", k, " is out of range; allowed: 1 <= k <= ", d);
  std::vector<int32_t> picked;
  picked.reserve(k);
  if (k == d) {
    for (int64_t i = 0; i < d; ++i) picked.push_back(static_cast<int32_t>(i));
  } else if (d <= 2048 * k) {
    // Dense enough for a bitmap of d bits (at most 256 bytes per index, less than a hash set's
    // nodes): membership is one bit, and a scan of the words yields the indices in order.
    std::vector<uint64_t> bits((d + 63) / 64, 0);
    auto test_set = [&bits](int64_t i) {
      const uint64_t bit = uint64_t(1) << (i & 63);
      const bool was = bits[i >> 6] & bit;
      bits[i >> 6] |= bit;
      return was;
    };
    uint64_t s = seed;
    for (int64_t j = d - k; j < d; ++j) {  // Floyd: uniform k-subset in k draws
      const int64_t t = static_cast<int64_t>(splitmix64(s) % static_cast<uint64_t>(j + 1));
      if (test_set(t)) test_set(j);
    }
    for (size_t w = 0; w < bits.size(); ++w)
      for (uint64_t b = bits[w]; b; b &= b - 1)
        picked.push_back(static_cast<int32_t>(int64_t(w) * 64 + __builtin_ctzll(b)));
  } else {
    std::unordered_set<int64_t> seen;
    seen.reserve(2 * k);
    uint64_t s = seed;
    for (int64_t j = d - k; j < d; ++j) {  // the same draws, remembered in a hash set
      const int64_t t = static_cast<int64_t>(splitmix64(s) % static_cast<uint64_t>(j + 1));
      const int64_t pick = seen.insert(t).second ? t : j;
      if (pick == j) seen.insert(j);
      picked.push_back(static_cast<int32_t>(pick));
    }
    std::sort(picked.begin(), picked.end());
  }
  at::Tensor out = at::empty({k}, at::kInt);
  std::copy(picked.begin(), picked.end(), out.data_ptr<int32_t>());
  return out;
}

// One seed per (user seed, step, bucket): the same on every rank, fresh every step.
inline uint64_t randk_seed(uint64_t seed, uint64_t step, uint64_t bucket) {
  uint64_t s = seed ^ (step * 0xD1B54A32D192ED03ull) ^ (bucket * 0xABC98388FB8FAC03ull);
  return splitmix64(s);
}

}  // namespace ef21

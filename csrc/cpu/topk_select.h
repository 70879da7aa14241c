// Exact Top-k of |p| by a histogram select on the bit patterns of |p| (for non-negative floats the
// bit pattern orders like the value). Two passes over the data:
//   1. a histogram of the top 16 bits of the key finds the bin that holds the k-th largest;
//   2. a compaction pass keeps every index above that bin and collects the bin's candidates;
// then an nth_element over the (few) candidates resolves the exact threshold, ties to the lower
// index. The selected set is unique, so the output (ascending indices) is the same for any
// thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace ef21::cpu {

template <typename T>
using key_t = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;

// Key of |v|: the bit pattern with the sign cleared. NaN sorts above inf, as in torch.topk.
template <typename T>
inline key_t<T> abs_key(T v) {
  key_t<T> bits;
  std::memcpy(&bits, &v, sizeof(T));
  return bits & ~(key_t<T>(1) << (sizeof(T) * 8 - 1));
}

// Writes the k selected indices, ascending, to `out`. value(i) gives p[i] as float or double.
template <typename T, typename ValueFn>
void select_topk_abs(int64_t d, int64_t k, const ValueFn& value, int32_t* out) {
  using K = key_t<T>;
  if (k >= d) {
    for (int64_t i = 0; i < d; ++i) out[i] = static_cast<int32_t>(i);
    return;
  }
  constexpr int kBinBits = 16;
  constexpr int kShift = sizeof(K) * 8 - 1 - kBinBits;
  constexpr int64_t kBins = int64_t(1) << kBinBits;
  constexpr int64_t kMinChunk = 1 << 15;

  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), d / kMinChunk));
  const int64_t chunk = (d + nchunks - 1) / nchunks;

  // Pass 1: per-chunk histograms, summed (integer counts, so the sum is order-free).
  std::vector<std::vector<int64_t>> hists(nchunks);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      auto& h = hists[c];
      h.assign(kBins, 0);
      const int64_t lo = c * chunk, hi = std::min(d, lo + chunk);
      for (int64_t i = lo; i < hi; ++i) ++h[abs_key<T>(value(i)) >> kShift];
    }
  });
  std::vector<int64_t> hist(kBins, 0);
  for (auto& h : hists)
    for (int64_t b = 0; b < kBins; ++b) hist[b] += h[b];

  int64_t bin = kBins - 1, above = 0;
  while (above + hist[bin] < k) above += hist[bin--];
  const int64_t need = k - above;  // how many of the threshold bin's elements are kept

  // Pass 2: per chunk, indices above the bin and the bin's candidates, both in index order.
  struct Cand {
    K key;
    int32_t idx;
  };
  std::vector<std::vector<int32_t>> ups(nchunks);
  std::vector<std::vector<Cand>> cands(nchunks);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * chunk, hi = std::min(d, lo + chunk);
      for (int64_t i = lo; i < hi; ++i) {
        const K key = abs_key<T>(value(i));
        const int64_t b = key >> kShift;
        if (b > bin) ups[c].push_back(static_cast<int32_t>(i));
        else if (b == bin) cands[c].push_back({key, static_cast<int32_t>(i)});
      }
    }
  });

  // Resolve: the need-th candidate in (key desc, index asc) order is the exact threshold.
  std::vector<Cand> all;
  for (auto& cs : cands) all.insert(all.end(), cs.begin(), cs.end());
  auto before = [](const Cand& a, const Cand& b) { return a.key != b.key ? a.key > b.key : a.idx < b.idx; };
  std::nth_element(all.begin(), all.begin() + (need - 1), all.end(), before);
  const Cand last = all[need - 1];
  auto kept = [&](const Cand& x) { return !before(last, x); };

  // Merge each chunk's two ascending lists into its slot of the output.
  std::vector<int64_t> offset(nchunks + 1, 0);
  for (int64_t c = 0; c < nchunks; ++c) {
    int64_t n = static_cast<int64_t>(ups[c].size());
    for (const auto& x : cands[c]) n += kept(x);
    offset[c + 1] = offset[c] + n;
  }
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int32_t* o = out + offset[c];
      auto u = ups[c].begin();
      for (const auto& x : cands[c]) {
        if (!kept(x)) continue;
        while (u != ups[c].end() && *u < x.idx) *o++ = *u++;
        *o++ = x.idx;
      }
      while (u != ups[c].end()) *o++ = *u++;
    }
  });
}

}  // namespace ef21::cpu

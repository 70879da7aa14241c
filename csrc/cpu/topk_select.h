// Exact Top-k of |p| by selecting on the bit patterns of |p| (for non-negative floats the bit
// pattern orders like the value; NaN sorts above inf, as in torch.topk).
//
// One pass over the data keeps, per chunk and in index order, every element whose key reaches a
// band [lo_key, hi_key]: those above the band are surely selected, those inside it are the
// candidates. A radix select over the candidates then finds the last selected one in
// (key desc, index asc) order, and a compaction writes the k indices, ascending. The band comes
//   - from a strided sample of the keys: one pass over the data, then a check that the band
//     holds the k-th largest (it misses on adversarial data, rarely otherwise), else
//   - from a histogram of the top key bits: two passes, always right.
// The selected set is unique (ties to the lower index), so the output is the same for any thread
// count and either band.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace ef21::cpu {

template <typename T>
using key_t = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;

// Key of |v|: the bit pattern with the sign cleared.
template <typename T>
inline key_t<T> abs_key(T v) {
  key_t<T> bits;
  std::memcpy(&bits, &v, sizeof(T));
  return bits & ~(key_t<T>(1) << (sizeof(T) * 8 - 1));
}

namespace detail {

// An entry (key, index), ordered so that `before(a, b)` means a is selected ahead of b (larger
// key, then lower index). A 32-bit key packs with the index into one integer.
template <typename K>
struct Entry;

template <>
struct Entry<uint32_t> {
  using type = uint64_t;
  static type make(uint32_t key, int64_t i) { return (type(key) << 32) | uint32_t(INT32_MAX - i); }
  static uint32_t key(type e) { return static_cast<uint32_t>(e >> 32); }
  static int32_t index(type e) { return INT32_MAX - static_cast<int32_t>(e & 0xffffffffu); }
  static bool before(type a, type b) { return a > b; }
};

template <>
struct Entry<uint64_t> {
  struct type {
    uint64_t key;
    int32_t idx;
  };
  static type make(uint64_t key, int64_t i) { return {key, static_cast<int32_t>(i)}; }
  static uint64_t key(const type& e) { return e.key; }
  static int32_t index(const type& e) { return e.idx; }
  static bool before(const type& a, const type& b) { return a.key != b.key ? a.key > b.key : a.idx < b.idx; }
};

// One chunk's split: every element whose key is >= lo_key, in index order. Those with keys
// above hi_key are surely selected; the others are the candidates.
template <typename K>
struct Split {
  typename Entry<K>::type* list;
  int64_t cap;    // list has cap + 1 slots; the count saturates at cap
  int64_t n = 0;  // entries
};

// One pass over [lo, hi). `dense` stores every element and advances by a flag (no branch to
// mispredict when many are kept); otherwise it branches, which is cheaper when few are.
template <typename T, typename ValueFn>
void split_range(int64_t lo, int64_t hi, const ValueFn& value, key_t<T> lo_key, bool dense, Split<key_t<T>>& s) {
  using K = key_t<T>;
  using E = Entry<K>;
  auto* l = s.list;
  const int64_t cap = s.cap;
  int64_t n = 0;
  if (dense) {
    // In blocks, so the clamp to the capacity stays off the loop-carried count where it cannot bind.
    constexpr int64_t kBlock = 1024;
    for (int64_t b = lo; b < hi; b += kBlock) {
      const int64_t e = std::min(hi, b + kBlock);
      if (n + (e - b) <= cap) {
        for (int64_t i = b; i < e; ++i) {
          const K key = abs_key<T>(value(i));
          l[n] = E::make(key, i);
          n += key >= lo_key;
        }
      } else {
        for (int64_t i = b; i < e; ++i) {
          const K key = abs_key<T>(value(i));
          l[n] = E::make(key, i);
          n = std::min<int64_t>(n + (key >= lo_key), cap);
        }
      }
    }
  } else {
    for (int64_t i = lo; i < hi; ++i) {
      const K key = abs_key<T>(value(i));
      if (key >= lo_key) {
        l[n] = E::make(key, i);
        n = std::min(n + 1, cap);
      }
    }
  }
  s.n = n;
}

// The need-th (1-based) of x[0, n) in selection order; x must be in index order, and is
// reordered. Radix rounds on the key narrow the range to one bin (the compaction keeps index
// order, so equal keys need no further work), then nth_element finishes a small remainder.
template <typename K>
typename Entry<K>::type nth_selected(typename Entry<K>::type* x, int64_t n, int64_t need) {
  using E = Entry<K>;
  using type = typename E::type;
  constexpr int kBits = 11;
  std::vector<int64_t> hist(int64_t(1) << kBits);
  while (n > 2048) {
    K lo = E::key(x[0]), hi = lo;
    for (int64_t j = 1; j < n; ++j) lo = std::min(lo, E::key(x[j])), hi = std::max(hi, E::key(x[j]));
    if (lo == hi) return x[need - 1];
    int shift = 0;
    while (((hi - lo) >> shift) >> kBits) ++shift;
    std::fill(hist.begin(), hist.end(), 0);
    for (int64_t j = 0; j < n; ++j) ++hist[(E::key(x[j]) - lo) >> shift];
    int64_t b = (hi - lo) >> shift;
    for (; need > hist[b]; --b) need -= hist[b];
    int64_t m = 0;
    for (int64_t j = 0; j < n; ++j) {
      x[m] = x[j];
      m += K((E::key(x[j]) - lo) >> shift) == K(b);
    }
    n = m;
  }
  std::nth_element(x, x + (need - 1), x + n, [](const type& a, const type& b) { return E::before(a, b); });
  return x[need - 1];
}

// If the splits hold the k-th largest among their candidates (fewer than k keys above hi_key,
// at least k entries in all), writes the k indices to `out` and returns true.
template <typename K>
bool resolve(const std::vector<Split<K>>& sp, K hi_key, int64_t k, int32_t* out) {
  using E = Entry<K>;
  using type = typename E::type;
  const int64_t nchunks = static_cast<int64_t>(sp.size());
  // Each chunk's candidates into its own region (as large as its list; only the used part is
  // touched), then packed together for the selection.
  std::vector<int64_t> base(nchunks + 1, 0), ncand(nchunks, 0);
  for (int64_t c = 0; c < nchunks; ++c) base[c + 1] = base[c] + sp[c].n + 1;
  std::unique_ptr<type[]> cands(new type[base[nchunks]]);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      type* x = cands.get() + base[c];
      int64_t m = 0;
      for (int64_t j = 0; j < sp[c].n; ++j) {
        x[m] = sp[c].list[j];
        m += E::key(x[m]) <= hi_key;
      }
      ncand[c] = m;
    }
  });
  int64_t n = 0, nc = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    std::copy(cands.get() + base[c], cands.get() + base[c] + ncand[c], cands.get() + nc);  // leftward
    n += sp[c].n, nc += ncand[c];
  }
  const int64_t nup = n - nc;
  if (nup >= k || n < k) return false;

  // The (k - nup)-th candidate in selection order is the last one selected.
  const type last = nth_selected<K>(cands.get(), nc, k - nup);
  auto kept = [&](const type& e) { return !E::before(last, e); };

  std::vector<int64_t> offset(nchunks + 1, 0);
  if (nchunks > 1) {
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) offset[c + 1] = std::count_if(sp[c].list, sp[c].list + sp[c].n, kept);
    });
    for (int64_t c = 0; c < nchunks; ++c) offset[c + 1] += offset[c];
  } else {
    offset[1] = k;
  }
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      if (offset[c + 1] == offset[c]) continue;
      // Branch-free up to the chunk's last kept entry, so no store lands past its range.
      const type* l = sp[c].list;
      int64_t end = sp[c].n;
      while (!kept(l[end - 1])) --end;
      int32_t* o = out + offset[c];
      int64_t m = 0;
      for (int64_t j = 0; j < end; ++j) {
        o[m] = E::index(l[j]);
        m += kept(l[j]);
      }
    }
  });
  return true;
}

}  // namespace detail

// Writes the k selected indices, ascending, to `out`. value(i) gives p[i] as T (float or double);
// it is called more than once per index, and must give the same result each time.
template <typename T, typename ValueFn>
void select_topk_abs(int64_t d, int64_t k, const ValueFn& value, int32_t* out) {
  using K = key_t<T>;
  if (k >= d) {
    for (int64_t i = 0; i < d; ++i) out[i] = static_cast<int32_t>(i);
    return;
  }
  constexpr int64_t kMinChunk = 1 << 15;
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), d / kMinChunk));
  const int64_t chunk = (d + nchunks - 1) / nchunks;
  auto chunk_lo = [&](int64_t c) { return std::min(d, c * chunk); };

  // Splits every chunk at lo_key into lists of the given capacities; returns the storage, which
  // `sp` points into.
  using entry_t = typename detail::Entry<K>::type;
  std::vector<detail::Split<K>> sp(nchunks);
  auto split_all = [&](K lo_key, bool dense, const std::vector<int64_t>& cap) {
    int64_t total = 0;
    for (int64_t c = 0; c < nchunks; ++c) total += cap[c] + 1;
    std::unique_ptr<entry_t[]> lists(new entry_t[total]);
    total = 0;
    for (int64_t c = 0; c < nchunks; ++c) {
      sp[c].list = lists.get() + total;
      sp[c].cap = cap[c];
      total += cap[c] + 1;
    }
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        detail::split_range<T>(chunk_lo(c), chunk_lo(c + 1), value, lo_key, dense, sp[c]);
    });
    return lists;
  };
  // Below this size a sample is too small to be useful.
  constexpr int64_t kMinSampled = 1 << 12;
  // Branch-free splitting pays once more than about this fraction of the elements is kept.
  constexpr double kDense = 0.02;

  if (d >= kMinSampled) {
    // The sample's k/d quantile, widened by 4 binomial standard deviations on each side. The
    // sample size balances its cost (a cache miss each) against the candidates a wider band
    // lets through (about 8 sd/m of d): m ~ (sqrt(q (1 - q)) d)^(2/3), at least 1/64 of d.
    const double q = double(k) / double(d);
    const int64_t m = std::min<int64_t>(
        std::max<int64_t>(1024, static_cast<int64_t>(std::pow(1.3 * std::sqrt(q * (1 - q)) * double(d), 2.0 / 3))),
        std::min<int64_t>(1 << 16, d >> 6));
    const int64_t stride = d / m;
    std::unique_ptr<K[]> s(new K[m]);
    for (int64_t j = 0; j < m; ++j) s[j] = abs_key<T>(value(j * stride));
    const double r = q * m, sd = std::sqrt(m * q * (1 - q));
    const int64_t r_hi = int64_t(r - 4 * sd) - 2;  // sample rank (0 = largest) of hi_key
    const int64_t r_lo = int64_t(r + 4 * sd) + 2;  // sample rank of lo_key
    K lo_key = 0, hi_key = std::numeric_limits<K>::max();
    if (r_lo < m) {
      std::nth_element(s.get(), s.get() + r_lo, s.get() + m, std::greater<K>());
      lo_key = s[r_lo];
    }
    if (r_hi >= 0) {
      std::nth_element(s.get(), s.get() + r_hi, s.get() + std::min(r_lo, m), std::greater<K>());
      hi_key = s[r_hi];
    }
    const double band = double(std::min(r_lo, m) - std::max<int64_t>(r_hi, 0)) / m;
    // Room for k surely selected and twice the expected candidates; a list that fills up means
    // the band missed (its last entries were dropped).
    const int64_t room = k + int64_t(2 * band * d) + 1024;
    std::vector<int64_t> cap(nchunks);
    for (int64_t c = 0; c < nchunks; ++c) cap[c] = std::min(chunk_lo(c + 1) - chunk_lo(c), room);
    auto lists = split_all(lo_key, q + band > kDense, cap);
    bool full = false;
    for (int64_t c = 0; c < nchunks; ++c) full |= sp[c].n == cap[c] && cap[c] < chunk_lo(c + 1) - chunk_lo(c);
    // A band that holds the k-th largest selects exactly; otherwise take the exact band below.
    if (!full && detail::resolve(sp, hi_key, k, out)) return;
  }

  // Histogram of the top key bits (fewer for small d, where the counts would cost more than the
  // candidates a coarse bin lets through); the band is the bin that holds the k-th largest key.
  const int bits = d < (1 << 17) ? 11 : 16;
  const int shift = static_cast<int>(sizeof(K) * 8) - 1 - bits;
  const int64_t nbins = int64_t(1) << bits;
  std::vector<uint32_t> hists(nchunks * nbins, 0);  // a chunk holds < 2^31 elements
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      uint32_t* h = hists.data() + c * nbins;
      for (int64_t i = chunk_lo(c), hi = chunk_lo(c + 1); i < hi; ++i) ++h[abs_key<T>(value(i)) >> shift];
    }
  });
  int64_t bin = nbins - 1, above = 0;
  for (;; --bin) {
    int64_t t = 0;
    for (int64_t c = 0; c < nchunks; ++c) t += hists[c * nbins + bin];
    if (above + t >= k) break;
    above += t;
  }
  std::vector<int64_t> cap(nchunks, 0);
  int64_t total = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    const uint32_t* h = hists.data() + c * nbins;
    for (int64_t b = bin; b < nbins; ++b) cap[c] += h[b];
    total += cap[c];
  }
  const K lo_key = K(bin) << shift, hi_key = lo_key | ((K(1) << shift) - 1);
  auto lists = split_all(lo_key, total > kDense * d, cap);
  const bool done = detail::resolve(sp, hi_key, k, out);
  TORCH_INTERNAL_ASSERT(done, "select_topk_abs: the histogram band must hold the k-th largest");
}

}  // namespace ef21::cpu

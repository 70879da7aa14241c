// Exact Top-k of |p| on the GPU, with no host synchronisation: a radix select on the bit patterns
// of |p| (11-bit digits, integer histograms, the prefix and the count still needed kept on the
// device), then an ordered compaction that keeps every index above the threshold key and the
// lowest-index ties, writing indices in ascending order. Mirrors ../cpu/topk_select.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_scan.cuh>

#include <cstdint>
#include <type_traits>

namespace ef21::cuda {

template <typename T>
using key_t = std::conditional_t<sizeof(T) == 8, unsigned int64_t, unsigned int>;

template <typename T>
__device__ __forceinline__ key_t<T> abs_key(T v) {
  key_t<T> bits;
  memcpy(&bits, &v, sizeof(T));
  return bits & ~(key_t<T>(1) << (sizeof(T) * 8 - 1));
}

// The radix select's progress, on the device: the key bits fixed so far and how many elements
// with that prefix are still to be taken.
template <typename K>
struct SelectState {
  K prefix;
  K mask;
  int64_t remaining;
};

constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;
constexpr int kThreads = 256;
constexpr int kItems = 8;  // per thread in the compaction: a block owns kThreads * kItems indices
constexpr int kTile = kThreads * kItems;

template <typename K>
__global__ void init_state_kernel(SelectState<K>* st, int64_t k) {
  st->prefix = 0;
  st->mask = 0;
  st->remaining = k;
}

template <typename S, typename F>
__global__ void digit_histogram_kernel(F value, int64_t d, const SelectState<key_t<S>>* st, int shift,
                                       unsigned int* hist) {
  using K = key_t<S>;
  __shared__ unsigned int local[kBins];
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const K prefix = st->prefix, mask = st->mask;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < d; i += int64_t(gridDim.x) * blockDim.x) {
    const K key = abs_key<S>(value(i));
    if ((key & mask) == prefix) atomicAdd(&local[(key >> shift) & (kBins - 1)], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kBins; b += blockDim.x)
    if (local[b]) atomicAdd(&hist[b], local[b]);
}

// One block: find the digit (from the top) where the running count reaches `remaining`, fix it in
// the prefix, and clear the histogram for the next digit.
template <typename K>
__global__ void pick_digit_kernel(unsigned int* hist, SelectState<K>* st, int shift, int bits) {
  constexpr int kPer = kBins / 1024;
  using Scan = cub::BlockScan<int64_t, 1024>;
  __shared__ typename Scan::TempStorage tmp;
  const int nb = 1 << bits;
  int64_t counts[kPer];
  int64_t sum = 0;
  for (int j = 0; j < kPer; ++j) {  // position q counts digits from the top: digit = nb - 1 - q
    const int q = threadIdx.x * kPer + j;
    counts[j] = q < nb ? hist[nb - 1 - q] : 0;
    sum += counts[j];
  }
  int64_t before;
  Scan(tmp).ExclusiveSum(sum, before);
  const int64_t remaining = st->remaining;
  __syncthreads();
  for (int j = 0; j < kPer; ++j) {
    const int q = threadIdx.x * kPer + j;
    if (before < remaining && before + counts[j] >= remaining) {
      st->prefix |= K(nb - 1 - q) << shift;
      st->mask |= K(nb - 1) << shift;
      st->remaining = remaining - before;
    }
    before += counts[j];
  }
  for (int q = threadIdx.x; q < kBins; q += blockDim.x) hist[q] = 0;
}

template <typename S, typename F>
__global__ void count_tile_kernel(F value, int64_t d, const SelectState<key_t<S>>* st, int64_t* gt,
                                  int64_t* eq) {
  using K = key_t<S>;
  using Reduce = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const K t = st->prefix;
  int64_t g = 0, e = 0;
  const int64_t base = int64_t(blockIdx.x) * kTile + threadIdx.x * kItems;
  for (int j = 0; j < kItems; ++j) {
    const int64_t i = base + j;
    if (i < d) {
      const K key = abs_key<S>(value(i));
      g += key > t;
      e += key == t;
    }
  }
  int64_t gs, es;
  Reduce(tmp).ExclusiveSum(g, gs);
  __syncthreads();
  Reduce(tmp).ExclusiveSum(e, es);
  if (threadIdx.x == kThreads - 1) {
    gt[blockIdx.x] = gs + g;
    eq[blockIdx.x] = es + e;
  }
}

// Position of a kept element = (elements above the threshold before it) + min(ties before it, need).
template <typename S, typename F>
__global__ void compact_kernel(F value, int64_t d, const SelectState<key_t<S>>* st, const int64_t* gt_before,
                               const int64_t* eq_before, int32_t* out) {
  using K = key_t<S>;
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const K t = st->prefix;
  const int64_t need = st->remaining;
  K keys[kItems];
  int64_t g = 0, e = 0;
  const int64_t base = int64_t(blockIdx.x) * kTile + threadIdx.x * kItems;
  for (int j = 0; j < kItems; ++j) {
    const int64_t i = base + j;
    keys[j] = i < d ? abs_key<S>(value(i)) : K(0);
    if (i < d) {
      g += keys[j] > t;
      e += keys[j] == t;
    }
  }
  int64_t gs, es;
  Scan(tmp).ExclusiveSum(g, gs);
  __syncthreads();
  Scan(tmp).ExclusiveSum(e, es);
  gs += gt_before[blockIdx.x];
  es += eq_before[blockIdx.x];
  for (int j = 0; j < kItems; ++j) {
    const int64_t i = base + j;
    if (i >= d) break;
    const bool above = keys[j] > t, tie = keys[j] == t;
    if (above || (tie && es < need)) out[gs + (es < need ? es : need)] = static_cast<int32_t>(i);
    gs += above;
    es += tie;
  }
}

__global__ void iota_kernel(int32_t* out, int64_t d) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < d; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = static_cast<int32_t>(i);
}

inline int grid_for(int64_t n, int threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, sms * 8)));
}

// Writes the k selected indices, ascending, to `out` (device memory) on the current stream.
// `value` is a device functor giving p[i] as float or double; `like` gives the device for scratch.
template <typename S, typename F>
void select_topk_abs(const F& value, int64_t d, int64_t k, int32_t* out, const at::Tensor& like) {
  using K = key_t<S>;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (k >= d) {
    iota_kernel<<<grid_for(d, kThreads), kThreads, 0, stream>>>(out, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  auto opts = like.options();
  at::Tensor st_buf = at::empty({static_cast<int64_t>(sizeof(SelectState<K>))}, opts.dtype(at::kByte));
  auto* st = reinterpret_cast<SelectState<K>*>(st_buf.data_ptr());
  at::Tensor hist = at::zeros({kBins}, opts.dtype(at::kInt));
  auto* h = reinterpret_cast<unsigned int*>(hist.data_ptr<int>());
  init_state_kernel<K><<<1, 1, 0, stream>>>(st, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  constexpr int kKeyBits = sizeof(K) * 8 - 1;  // the sign bit is always clear
  for (int hi = kKeyBits; hi > 0; hi -= kDigitBits) {
    const int bits = std::min(kDigitBits, hi);
    const int shift = hi - bits;
    digit_histogram_kernel<S><<<grid_for(d, kThreads), kThreads, 0, stream>>>(value, d, st, shift, h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pick_digit_kernel<K><<<1, 1024, 0, stream>>>(h, st, shift, bits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t tiles = (d + kTile - 1) / kTile;
  at::Tensor counts = at::empty({4, tiles}, opts.dtype(at::kLong));
  auto* gt = counts[0].data_ptr<int64_t>();
  auto* eq = counts[1].data_ptr<int64_t>();
  auto* gt_before = counts[2].data_ptr<int64_t>();
  auto* eq_before = counts[3].data_ptr<int64_t>();
  count_tile_kernel<S><<<tiles, kThreads, 0, stream>>>(value, d, st, gt,
                                                          eq);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  size_t tmp_bytes = 0;
  cub::DeviceScan::ExclusiveSum(nullptr, tmp_bytes, gt, gt_before, tiles, stream);
  at::Tensor tmp = at::empty({static_cast<int64_t>(tmp_bytes)}, opts.dtype(at::kByte));
  cub::DeviceScan::ExclusiveSum(tmp.data_ptr(), tmp_bytes, gt, gt_before, tiles, stream);
  cub::DeviceScan::ExclusiveSum(tmp.data_ptr(), tmp_bytes, eq, eq_before, tiles, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  compact_kernel<S><<<tiles, kThreads, 0, stream>>>(value, d, st, gt_before,
                                                       eq_before, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace ef21::cuda

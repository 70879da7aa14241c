// CUDA implementations of the ef21 operators (schemas in ../ops.cpp); they mirror
// ../cpu/ops_cpu.cpp and must give the same indices, values and state bit for bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../algorithm.h"
#include "../op_args.h"
#include "topk_select.cuh"

namespace ef21::cuda {
namespace {

// p[i], the vector whose Top-k is sent, for each algorithm (see ops.cpp). With update=false the
// state is only read and v (ef21-sgdm) or e + grad (ef) is formed on the fly, with the same
// operations materialise_kernel performs.
template <typename G, typename S>
struct Target {
  const G* g;
  const S* st;
  const S* ax;
  Algorithm algo;
  S eta;
  bool update;
  __device__ __forceinline__ S operator()(int64_t i) const {
    switch (algo) {
      case Algorithm::EF21: return static_cast<S>(g[i]) - st[i];
      case Algorithm::EF21_SGDM:
        return (update ? ax[i] : (S(1) - eta) * ax[i] + eta * static_cast<S>(g[i])) - st[i];
      case Algorithm::EF: return update ? st[i] : st[i] + static_cast<S>(g[i]);
      default: return static_cast<S>(g[i]);
    }
  }
};

template <typename T>
struct Load {
  const T* x;
  __device__ __forceinline__ auto operator()(int64_t i) const {
    using acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
    return static_cast<acc>(x[i]);
  }
};

// Packed rows are [k int32 | k values] back to back, so values and later rows can sit at addresses
// their type does not allow (odd k); message bytes are read and written through memcpy.
template <typename T>
__device__ __forceinline__ T load(const uint8_t* p, int64_t j) {
  T v;
  memcpy(&v, p + j * static_cast<int64_t>(sizeof(T)), sizeof(T));
  return v;
}
template <typename T>
__device__ __forceinline__ void store(uint8_t* p, int64_t j, T v) {
  memcpy(p + j * static_cast<int64_t>(sizeof(T)), &v, sizeof(T));
}

// The verdict flag of commit_ / aggregate_: null (always apply) or one bool on the device.
__device__ __forceinline__ bool skipped(const bool* ok) { return ok != nullptr && !*ok; }

template <typename G, typename S>
__global__ void materialise_kernel(Algorithm algo, const G* g, S* st, S* ax, S eta, int64_t d, const bool* ok) {
  if (skipped(ok)) return;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < d; i += int64_t(gridDim.x) * blockDim.x) {
    if (algo == Algorithm::EF21_SGDM) ax[i] = (S(1) - eta) * ax[i] + eta * static_cast<S>(g[i]);
    else st[i] += static_cast<S>(g[i]);
  }
}

template <typename G, typename S, typename W>
__global__ void pack_update_kernel(Target<G, S> value, S* st, const int32_t* idx, uint8_t* vals, int64_t k) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < k; j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx[j];
    const W w = static_cast<W>(value(i));
    const S c = static_cast<S>(w);
    store<W>(vals, j, w);
    if (!value.update) continue;
    if (value.algo == Algorithm::EF21 || value.algo == Algorithm::EF21_SGDM) st[i] += c;
    else if (value.algo == Algorithm::EF) st[i] -= c;
  }
}

std::tuple<at::Tensor, at::Tensor> topk_abs_cuda(const at::Tensor& x_in, int64_t k) {
  check_topk_args(x_in, k);
  const int64_t d = x_in.numel();
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor idx = at::empty({k}, x.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_abs_cuda", [&] {
    using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    select_topk_abs<acc>(Load<scalar_t>{x.const_data_ptr<scalar_t>()}, d, k, idx.data_ptr<int32_t>(), x);
  });
  return {idx, x.index_select(0, idx)};
}

// The verdict flag as a device pointer (null: always apply); never read on the host.
const bool* ok_ptr(const std::optional<at::Tensor>& ok, const at::Tensor& like) {
  if (!ok.has_value()) return nullptr;
  check_ok(*ok, like.device());
  return ok->const_data_ptr<bool>();
}

at::Tensor compress_cuda(const at::Tensor& grad, const std::optional<at::Tensor>& state,
                         const std::optional<at::Tensor>& aux, c10::string_view algorithm, int64_t k, double momentum,
                         const std::optional<at::Tensor>& indices, at::ScalarType value_dtype, bool update_state) {
  const auto [algo, sdt] = check_step_args(grad, state, aux, algorithm, k, indices, value_dtype, "compress_");
  const bool needs_state = algo != Algorithm::PLAIN;
  const bool needs_aux = algo == Algorithm::EF21_SGDM;
  const int64_t d = grad.numel();
  c10::cuda::CUDAGuard guard(grad.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const bool packed = !indices.has_value();
  const int64_t vbytes = c10::elementSize(value_dtype);
  at::Tensor msg = packed ? at::empty({packed_bytes(k, vbytes)}, grad.options().dtype(at::kByte))
                          : at::empty({k}, grad.options().dtype(value_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "compress_cuda", [&] {
    using G = scalar_t;
    auto with_state = [&](auto s_tag) {
      using S = decltype(s_tag);
      S* st = needs_state ? state->data_ptr<S>() : nullptr;
      S* ax = needs_aux ? aux->data_ptr<S>() : nullptr;
      const G* g = grad.const_data_ptr<G>();
      if (update_state && (algo == Algorithm::EF21_SGDM || algo == Algorithm::EF)) {
        materialise_kernel<G, S><<<grid_for(d, kThreads), kThreads, 0, stream>>>(
            algo, g, st, ax, static_cast<S>(momentum), d, nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const Target<G, S> value{g, st, ax, algo, static_cast<S>(momentum), update_state};
      int32_t* idx = packed ? reinterpret_cast<int32_t*>(msg.data_ptr<uint8_t>()) : indices->data_ptr<int32_t>();
      if (packed) select_topk_abs<S>(value, d, k, idx, grad);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value_dtype, "compress_cuda_values", [&] {
        using W = scalar_t;
        uint8_t* vals = static_cast<uint8_t*>(msg.data_ptr()) + (packed ? 4 * k : 0);
        pack_update_kernel<G, S, W><<<grid_for(k, kThreads), kThreads, 0, stream>>>(value, st, idx, vals, k);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    if (sdt == at::kDouble) with_state(double{});
    else with_state(float{});
  });
  return msg;
}

// One launch per message, in row order: the indices of one message are distinct, so no two
// threads touch the same element, and rows never race. Out-of-range indices are skipped (a
// device-side check that needs no host synchronisation).
template <typename O, typename W>
__global__ void apply_message_kernel(O* out, int64_t d, const uint8_t* idx, const uint8_t* vals, int64_t k,
                                     double scale, const bool* ok) {
  if (skipped(ok)) return;
  using acc = std::conditional_t<std::is_same_v<O, double>, double, float>;
  const acc s = static_cast<acc>(scale);
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < k; j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = load<int32_t>(idx, j);
    if (i >= 0 && i < d) out[i] = static_cast<O>(static_cast<acc>(out[i]) + s * static_cast<acc>(load<W>(vals, j)));
  }
}

// One launch per message, in row order.
template <typename O, typename W>
void apply_messages(O* out, int64_t d, const Messages& m, double scale, const bool* ok, cudaStream_t stream) {
  for (int64_t r = 0; r < m.n; ++r) {
    apply_message_kernel<O, W><<<grid_for(m.k, kThreads), kThreads, 0, stream>>>(out, d, m.idx(r), m.vals(r), m.k,
                                                                                  scale, ok);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor& aggregate_cuda(at::Tensor& out, const at::Tensor& messages, int64_t k, at::ScalarType value_dtype,
                           double scale, const std::optional<at::Tensor>& indices,
                           const std::optional<at::Tensor>& ok) {
  check_flat(out, "out", out.device());
  const Messages m = messages_of(messages, k, value_dtype, indices, out.device());
  const bool* okp = ok_ptr(ok, out);
  c10::cuda::CUDAGuard guard(out.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "aggregate_cuda", [&] {
    using O = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value_dtype, "aggregate_cuda_values", [&] {
      apply_messages<O, scalar_t>(out.data_ptr<O>(), out.numel(), m, scale, okp, stream);
    });
  });
  return out;
}

void commit_cuda(const at::Tensor& grad, const std::optional<at::Tensor>& state, const std::optional<at::Tensor>& aux,
                 const at::Tensor& message, c10::string_view algorithm, int64_t k, double momentum,
                 const std::optional<at::Tensor>& indices, at::ScalarType value_dtype,
                 const std::optional<at::Tensor>& ok) {
  const auto [algo, sdt] = check_step_args(grad, state, aux, algorithm, k, indices, value_dtype, "commit_");
  TORCH_CHECK(message.dim() == 1, "message must be 1-D (as compress_ returns it), got ", message.dim(), "-D");
  const Messages m = messages_of(message.view({1, message.numel()}), k, value_dtype, indices, grad.device());
  const bool* okp = ok_ptr(ok, grad);
  if (algo == Algorithm::PLAIN) return;
  const int64_t d = grad.numel();
  c10::cuda::CUDAGuard guard(grad.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "commit_cuda", [&] {
    using G = scalar_t;
    auto with_state = [&](auto s_tag) {
      using S = decltype(s_tag);
      S* st = state->data_ptr<S>();
      S* ax = algo == Algorithm::EF21_SGDM ? aux->data_ptr<S>() : nullptr;
      if (algo == Algorithm::EF21_SGDM || algo == Algorithm::EF) {
        materialise_kernel<G, S><<<grid_for(d, kThreads), kThreads, 0, stream>>>(
            algo, grad.const_data_ptr<G>(), st, ax, static_cast<S>(momentum), d, okp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      // g_i += c (ef21, ef21-sgdm) or e -= c (ef): x + 1*c and x + (-1)*c round as x + c and x - c.
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value_dtype, "commit_cuda_values", [&] {
        apply_messages<S, scalar_t>(st, d, m, algo == Algorithm::EF ? -1.0 : 1.0, okp, stream);
      });
    };
    if (sdt == at::kDouble) with_state(double{});
    else with_state(float{});
  });
}

template <typename W>
__global__ void all_finite_kernel(const uint8_t* base, int64_t n, int64_t row_bytes, int64_t k, bool* ok) {
  using acc = std::conditional_t<std::is_same_v<W, double>, double, float>;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < n * k; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = t / k, j = t % k;
    // Any number of threads may write, and all of them write false.
    if (!isfinite(static_cast<acc>(load<W>(base + r * row_bytes + 4 * k, j)))) *ok = false;
  }
}

at::Tensor& all_finite_cuda(at::Tensor& ok, const at::Tensor& messages, int64_t k, at::ScalarType value_dtype) {
  ok_ptr(ok, ok);  // checks its type
  const Messages m = messages_of(messages, k, value_dtype, std::nullopt, ok.device());
  if (m.n == 0) return ok;
  c10::cuda::CUDAGuard guard(ok.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value_dtype, "all_finite_cuda", [&] {
    all_finite_kernel<scalar_t><<<grid_for(m.n * k, kThreads), kThreads, 0, stream>>>(m.base, m.n, m.row_bytes, k,
                                                                                       ok.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return ok;
}

// Every thread reads the two scales and leaves at once when they agree: a launch that moves no
// data on the steps where the loss scale did not change.
template <typename S>
__global__ void rescale_kernel(S* x, int64_t d, const float* scale, const float* seen) {
  const float s = *scale, z = *seen;
  if (s == z) return;
  const S r = static_cast<S>(s) / static_cast<S>(z);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < d; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = x[i] * r;
}

__global__ void set_seen_kernel(const float* scale, float* seen) { *seen = *scale; }

void rescale_cuda(at::TensorList tensors, const at::Tensor& scale, const at::Tensor& seen) {
  for (const auto* t : {&scale, &seen}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == 1 && t->is_cuda(),
                "scale and seen must be one float32 each on a CUDA device, got ", t->scalar_type(), " with ",
                t->numel(), " elements on ", t->device());
  }
  TORCH_CHECK(scale.device() == seen.device(), "scale and seen must be on one device, got ", scale.device(), " and ",
              seen.device());
  c10::cuda::CUDAGuard guard(seen.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device() == seen.device() && t.is_contiguous(), "tensors must be contiguous on ", seen.device());
    const int64_t d = t.numel();
    if (d == 0) continue;
    if (t.scalar_type() == at::kDouble) {
      rescale_kernel<double><<<grid_for(d, kThreads), kThreads, 0, stream>>>(t.data_ptr<double>(), d,
                                                                             scale.const_data_ptr<float>(),
                                                                             seen.const_data_ptr<float>());
    } else {
      TORCH_CHECK(t.scalar_type() == at::kFloat, "tensors must be float32 or float64, got ", t.scalar_type());
      rescale_kernel<float><<<grid_for(d, kThreads), kThreads, 0, stream>>>(t.data_ptr<float>(), d,
                                                                            scale.const_data_ptr<float>(),
                                                                            seen.const_data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // Ordered after the kernels above on the stream, so they all read the old `seen`.
  set_seen_kernel<<<1, 1, 0, stream>>>(scale.const_data_ptr<float>(), seen.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(ef21, CUDA, m) {
  m.impl("topk_abs", &topk_abs_cuda);
  m.impl("compress_", &compress_cuda);
  m.impl("commit_", &commit_cuda);
  m.impl("aggregate_", &aggregate_cuda);
  m.impl("all_finite_", &all_finite_cuda);
  m.impl("rescale_", &rescale_cuda);
}

}  // namespace ef21::cuda

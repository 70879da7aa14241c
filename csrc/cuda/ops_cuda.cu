// CUDA implementations of the ef21 operators (schemas in ../ops.cpp); they mirror
// ../cpu/ops_cpu.cpp and must give the same indices, values and state bit for bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../algorithm.h"
#include "topk_select.cuh"

namespace ef21::cuda {
namespace {

void check_flat(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.is_cuda(), name, " must be on a CUDA device, got ", t.device());
}

// p[i], the vector whose Top-k is sent, for each algorithm (see ops.cpp).
template <typename G, typename S>
struct Target {
  const G* g;
  const S* st;
  const S* ax;
  Algorithm algo;
  __device__ __forceinline__ S operator()(int64_t i) const {
    switch (algo) {
      case Algorithm::EF21: return static_cast<S>(g[i]) - st[i];
      case Algorithm::EF21_SGDM: return ax[i] - st[i];
      case Algorithm::EF: return st[i];
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

template <typename G, typename S>
__global__ void materialise_kernel(Algorithm algo, const G* g, S* st, S* ax, S eta, int64_t d) {
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
    if (value.algo == Algorithm::EF21 || value.algo == Algorithm::EF21_SGDM) st[i] += c;
    else if (value.algo == Algorithm::EF) st[i] -= c;
  }
}

std::tuple<at::Tensor, at::Tensor> topk_abs_cuda(const at::Tensor& x_in, int64_t k) {
  TORCH_CHECK(x_in.dim() == 1, "x must be 1-D, got ", x_in.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "x must be floating point, got ", x_in.scalar_type());
  const int64_t d = x_in.numel();
  TORCH_CHECK(d < (int64_t(1) << 31), "x has ", d, " elements; at most 2^31 - 1 are supported");
  TORCH_CHECK(k >= 1 && k <= d, "k=", k, " is out of range; allowed: 1 <= k <= ", d, " (x.numel())");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor idx = at::empty({k}, x.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_abs_cuda", [&] {
    using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    select_topk_abs<acc>(Load<scalar_t>{x.const_data_ptr<scalar_t>()}, d, k, idx.data_ptr<int32_t>(), x);
  });
  return {idx, x.index_select(0, idx)};
}

at::Tensor compress_cuda(const at::Tensor& grad, const std::optional<at::Tensor>& state,
                         const std::optional<at::Tensor>& aux, c10::string_view algorithm, int64_t k, double momentum,
                         const std::optional<at::Tensor>& indices, at::ScalarType value_dtype) {
  const Algorithm algo = parse_algorithm(std::string_view(algorithm.data(), algorithm.size()));
  TORCH_CHECK(algo != Algorithm::DENSE, "compress_ has nothing to do for algorithm='dense'");
  check_flat(grad, "grad");
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), "grad must be floating point, got ", grad.scalar_type());
  const int64_t d = grad.numel();
  TORCH_CHECK(d < (int64_t(1) << 31), "grad has ", d, " elements; at most 2^31 - 1 are supported");
  TORCH_CHECK(k >= 1 && k <= d, "k=", k, " is out of range; allowed: 1 <= k <= ", d, " (grad.numel())");
  TORCH_CHECK(value_dtype == at::kFloat || value_dtype == at::kBFloat16 || value_dtype == at::kHalf ||
                  value_dtype == at::kDouble,
              "value_dtype=", value_dtype, " is not supported; allowed: Float, BFloat16, Half, Double");
  const bool needs_state = algo != Algorithm::PLAIN;
  const bool needs_aux = algo == Algorithm::EF21_SGDM;
  TORCH_CHECK(!needs_state || state.has_value(), "algorithm='", algorithm, "' needs a state tensor");
  TORCH_CHECK(!needs_aux || aux.has_value(), "algorithm='", algorithm, "' needs an aux (momentum) tensor");
  at::ScalarType sdt = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (needs_state) {
    check_flat(*state, "state");
    sdt = state->scalar_type();
    TORCH_CHECK(sdt == at::kFloat || sdt == at::kDouble, "state must be float32 or float64, got ", sdt);
    TORCH_CHECK(state->numel() == d, "state has ", state->numel(), " elements, grad has ", d);
  }
  if (needs_aux) {
    check_flat(*aux, "aux");
    TORCH_CHECK(aux->scalar_type() == sdt, "aux must have the state's dtype ", sdt, ", got ", aux->scalar_type());
    TORCH_CHECK(aux->numel() == d, "aux has ", aux->numel(), " elements, grad has ", d);
  }
  if (indices.has_value()) {
    check_flat(*indices, "indices");
    TORCH_CHECK(indices->scalar_type() == at::kInt, "indices must be int32, got ", indices->scalar_type());
    TORCH_CHECK(indices->numel() == k, "indices has ", indices->numel(), " elements, expected k=", k);
  }
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
      if (algo == Algorithm::EF21_SGDM || algo == Algorithm::EF) {
        materialise_kernel<G, S><<<grid_for(d, kThreads), kThreads, 0, stream>>>(algo, g, st, ax,
                                                                                 static_cast<S>(momentum), d);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const Target<G, S> value{g, st, ax, algo};
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
                                     double scale) {
  using acc = std::conditional_t<std::is_same_v<O, double>, double, float>;
  const acc s = static_cast<acc>(scale);
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < k; j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = load<int32_t>(idx, j);
    if (i >= 0 && i < d) out[i] = static_cast<O>(static_cast<acc>(out[i]) + s * static_cast<acc>(load<W>(vals, j)));
  }
}

at::Tensor& aggregate_cuda(at::Tensor& out, const at::Tensor& messages, int64_t k, at::ScalarType value_dtype,
                           double scale, const std::optional<at::Tensor>& indices) {
  check_flat(out, "out");
  TORCH_CHECK(messages.dim() == 2 && messages.is_contiguous(), "messages must be a contiguous 2-D tensor [n, m]");
  TORCH_CHECK(messages.device() == out.device(), "messages must be on out's device ", out.device());
  TORCH_CHECK(k >= 1, "k=", k, " is out of range; allowed: k >= 1");
  const int64_t n = messages.size(0);
  const int64_t vbytes = c10::elementSize(value_dtype);
  int64_t row_bytes;
  const int32_t* shared_idx = nullptr;
  if (indices.has_value()) {
    check_flat(*indices, "indices");
    TORCH_CHECK(indices->scalar_type() == at::kInt && indices->numel() == k, "indices must be int32 with k=", k, " elements");
    TORCH_CHECK(messages.scalar_type() == value_dtype && messages.size(1) == k,
                "messages must be [n, k] of value_dtype when indices are given, got ", messages.sizes(), " ",
                messages.scalar_type());
    shared_idx = indices->const_data_ptr<int32_t>();
    row_bytes = k * vbytes;
  } else {
    TORCH_CHECK(messages.scalar_type() == at::kByte, "packed messages must be uint8, got ", messages.scalar_type());
    row_bytes = packed_bytes(k, vbytes);
    TORCH_CHECK(messages.size(1) == row_bytes, "packed messages must have ", row_bytes, " bytes per row for k=", k,
                " and value_dtype=", value_dtype, ", got ", messages.size(1));
  }
  c10::cuda::CUDAGuard guard(out.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto* base = static_cast<const uint8_t*>(messages.const_data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "aggregate_cuda", [&] {
    using O = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value_dtype, "aggregate_cuda_values", [&] {
      using W = scalar_t;
      for (int64_t r = 0; r < n; ++r) {
        const uint8_t* row = base + r * row_bytes;
        const uint8_t* ix = shared_idx ? reinterpret_cast<const uint8_t*>(shared_idx) : row;
        const uint8_t* v = shared_idx ? row : row + 4 * k;
        apply_message_kernel<O, W><<<grid_for(k, kThreads), kThreads, 0, stream>>>(out.data_ptr<O>(), out.numel(), ix,
                                                                                    v, k, scale);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ef21, CUDA, m) {
  m.impl("topk_abs", &topk_abs_cuda);
  m.impl("compress_", &compress_cuda);
  m.impl("aggregate_", &aggregate_cuda);
}

}  // namespace ef21::cuda

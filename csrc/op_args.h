// Argument checks and message layout shared by the CPU and CUDA kernels, so both refuse the same
// input with the same words. Host code only: nothing here reads a tensor's data.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <utility>

#include "algorithm.h"

namespace ef21 {

// A 1-D contiguous tensor on the device the kernel runs on.
inline void check_flat(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
}

inline void check_value_dtype(at::ScalarType value_dtype) {
  TORCH_CHECK(value_dtype == at::kFloat || value_dtype == at::kBFloat16 || value_dtype == at::kHalf ||
                  value_dtype == at::kDouble,
              "value_dtype=", value_dtype, " is not supported; allowed: Float, BFloat16, Half, Double");
}

inline void check_topk_args(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 1, "x must be 1-D, got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be floating point, got ", x.scalar_type());
  const int64_t d = x.numel();
  TORCH_CHECK(d < (int64_t(1) << 31), "x has ", d, " elements; at most 2^31 - 1 are supported");
  TORCH_CHECK(k >= 1 && k <= d, "k=", k, " is out of range; allowed: 1 <= k <= ", d, " (x.numel())");
}

// The checks compress_ and commit_ share, on grad's device; returns the algorithm and the state
// dtype. Index values are not read here (on CUDA that would synchronise).
inline std::pair<Algorithm, at::ScalarType> check_step_args(const at::Tensor& grad,
                                                            const std::optional<at::Tensor>& state,
                                                            const std::optional<at::Tensor>& aux,
                                                            c10::string_view algorithm, int64_t k,
                                                            const std::optional<at::Tensor>& indices,
                                                            at::ScalarType value_dtype, const char* op) {
  const Algorithm algo = parse_algorithm(std::string_view(algorithm.data(), algorithm.size()));
  TORCH_CHECK(algo != Algorithm::DENSE, op, " has nothing to do for algorithm='dense'");
  const at::Device device = grad.device();
  check_flat(grad, "grad", device);
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), "grad must be floating point, got ", grad.scalar_type());
  const int64_t d = grad.numel();
  TORCH_CHECK(d < (int64_t(1) << 31), "grad has ", d, " elements; at most 2^31 - 1 are supported");
  TORCH_CHECK(k >= 1 && k <= d, "k=", k, " is out of range; allowed: 1 <= k <= ", d, " (grad.numel())");
  check_value_dtype(value_dtype);
  const bool needs_state = algo != Algorithm::PLAIN;
  const bool needs_aux = algo == Algorithm::EF21_SGDM;
  TORCH_CHECK(!needs_state || state.has_value(), "algorithm='", algorithm, "' needs a state tensor");
  TORCH_CHECK(!needs_aux || aux.has_value(), "algorithm='", algorithm, "' needs an aux (momentum) tensor");
  at::ScalarType sdt = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (needs_state) {
    check_flat(*state, "state", device);
    sdt = state->scalar_type();
    TORCH_CHECK(sdt == at::kFloat || sdt == at::kDouble, "state must be float32 or float64, got ", sdt);
    TORCH_CHECK(state->numel() == d, "state has ", state->numel(), " elements, grad has ", d);
  }
  if (needs_aux) {
    check_flat(*aux, "aux", device);
    TORCH_CHECK(aux->scalar_type() == sdt, "aux must have the state's dtype ", sdt, ", got ", aux->scalar_type());
    TORCH_CHECK(aux->numel() == d, "aux has ", aux->numel(), " elements, grad has ", d);
  }
  if (indices.has_value()) {
    check_flat(*indices, "indices", device);
    TORCH_CHECK(indices->scalar_type() == at::kInt, "indices must be int32, got ", indices->scalar_type());
    TORCH_CHECK(indices->numel() == k, "indices has ", indices->numel(), " elements, expected k=", k);
  }
  return {algo, sdt};
}

// The verdict flag of commit_ / aggregate_: one bool on `device`.
inline void check_ok(const at::Tensor& ok, const at::Device& device) {
  TORCH_CHECK(ok.scalar_type() == at::kBool && ok.numel() == 1, "ok must be one bool, got ", ok.scalar_type(),
              " with ", ok.numel(), " elements");
  TORCH_CHECK(ok.device() == device, "ok must be on ", device, ", got ", ok.device());
}

// A batch of messages as aggregate_ reads them: n rows of packed [k int32 | k values], or n rows
// of k values for the shared `indices`.
struct Messages {
  const uint8_t* base;
  int64_t n, row_bytes, k;
  const int32_t* shared_idx;  // Rand-k's shared support, or null for packed rows
  const uint8_t* idx(int64_t r) const {
    return shared_idx ? reinterpret_cast<const uint8_t*>(shared_idx) : base + r * row_bytes;
  }
  const uint8_t* vals(int64_t r) const { return shared_idx ? base + r * row_bytes : base + r * row_bytes + 4 * k; }
};

inline Messages messages_of(const at::Tensor& messages, int64_t k, at::ScalarType value_dtype,
                            const std::optional<at::Tensor>& indices, const at::Device& device) {
  TORCH_CHECK(messages.dim() == 2 && messages.is_contiguous(), "messages must be a contiguous 2-D tensor [n, m]");
  TORCH_CHECK(messages.device() == device, "messages must be on ", device, ", got ", messages.device());
  TORCH_CHECK(k >= 1, "k=", k, " is out of range; allowed: k >= 1");
  check_value_dtype(value_dtype);
  const int64_t vbytes = c10::elementSize(value_dtype);
  Messages m{static_cast<const uint8_t*>(messages.const_data_ptr()), messages.size(0), 0, k, nullptr};
  if (indices.has_value()) {
    check_flat(*indices, "indices", device);
    TORCH_CHECK(indices->scalar_type() == at::kInt && indices->numel() == k, "indices must be int32 with k=", k,
                " elements");
    TORCH_CHECK(messages.scalar_type() == value_dtype && messages.size(1) == k,
                "messages must be [n, k] of value_dtype when indices are given, got ", messages.sizes(), " ",
                messages.scalar_type());
    m.shared_idx = indices->const_data_ptr<int32_t>();
    m.row_bytes = k * vbytes;
  } else {
    TORCH_CHECK(messages.scalar_type() == at::kByte, "packed messages must be uint8, got ", messages.scalar_type());
    m.row_bytes = packed_bytes(k, vbytes);
    TORCH_CHECK(messages.size(1) == m.row_bytes, "packed messages must have ", m.row_bytes, " bytes per row for k=", k,
                " and value_dtype=", value_dtype, ", got ", messages.size(1));
  }
  return m;
}

}  // namespace ef21

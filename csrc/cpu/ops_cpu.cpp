// CPU implementations of the ef21 operators (schemas in ../ops.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstring>

#include "../algorithm.h"
#include "../op_args.h"
#include "topk_select.h"

namespace ef21::cpu {
namespace {

constexpr int64_t kGrain = 1 << 14;

// Packed messages are [k int32 | k values] back to back, so for odd k the values (8-byte) or the
// next row's indices (rows of k*(4+2) bytes) sit at addresses their type does not allow; every
// access to message bytes goes through memcpy, which compiles to a plain (unaligned) move.
template <typename T>
inline T load(const uint8_t* p, int64_t j) {
  T v;
  std::memcpy(&v, p + j * static_cast<int64_t>(sizeof(T)), sizeof(T));
  return v;
}
template <typename T>
inline void store(uint8_t* p, int64_t j, T v) {
  std::memcpy(p + j * static_cast<int64_t>(sizeof(T)), &v, sizeof(T));
}

const at::Device kCpu(at::kCPU);

std::tuple<at::Tensor, at::Tensor> topk_abs_cpu(const at::Tensor& x_in, int64_t k) {
  check_topk_args(x_in, k);
  const int64_t d = x_in.numel();
  const at::Tensor x = x_in.contiguous();
  at::Tensor idx = at::empty({k}, x.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_abs", [&] {
    using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    select_topk_abs<acc>(d, k, [p](int64_t i) { return static_cast<acc>(p[i]); }, idx.data_ptr<int32_t>());
  });
  return {idx, x.index_select(0, idx)};
}

// The part of the state update that touches every element: v = (1-eta) v + eta grad (ef21-sgdm)
// or e = e + grad (ef). compress_ with update_state=False forms the same values on the fly.
template <typename G, typename S>
void materialise(Algorithm algo, const G* g, S* st, S* ax, S eta, int64_t d) {
  if (algo == Algorithm::EF21_SGDM) {
    at::parallel_for(0, d, kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) ax[i] = (S(1) - eta) * ax[i] + eta * static_cast<S>(g[i]);
    });
  } else if (algo == Algorithm::EF) {
    at::parallel_for(0, d, kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) st[i] += static_cast<S>(g[i]);
    });
  }
}

// p[i], what compress_ selects over and sends: grad - g_i (ef21), v' - g_i (ef21-sgdm), e' (ef) or
// grad (plain), where v' and e' are the updated v and e: read from the state when compress_
// materialised them first, formed on the fly (the same expression, so the same bits) when the
// update is deferred to commit_. The algorithm is a template argument so that the selection's
// passes compile to straight loads and arithmetic, without a branch per element.
template <Algorithm A, bool kOnTheFly, typename G, typename S>
struct Target {
  const G* g;
  const S* st;
  const S* ax;
  S eta;
  S operator()(int64_t i) const {
    if constexpr (A == Algorithm::EF21) return static_cast<S>(g[i]) - st[i];
    else if constexpr (A == Algorithm::EF21_SGDM && kOnTheFly)
      return ((S(1) - eta) * ax[i] + eta * static_cast<S>(g[i])) - st[i];
    else if constexpr (A == Algorithm::EF21_SGDM) return ax[i] - st[i];
    else if constexpr (A == Algorithm::EF && kOnTheFly) return st[i] + static_cast<S>(g[i]);
    else if constexpr (A == Algorithm::EF) return st[i];
    else return static_cast<S>(g[i]);
  }
};

// Calls f(target) with the Target of `algo`; the state is read only if `algo` keeps one.
template <typename G, typename S, typename F>
void with_target(Algorithm algo, bool on_the_fly, const G* g, const S* st, const S* ax, S eta, F&& f) {
  using A = Algorithm;
  switch (algo) {
    case A::EF21: return f(Target<A::EF21, false, G, S>{g, st, ax, eta});
    case A::EF21_SGDM:
      if (on_the_fly) return f(Target<A::EF21_SGDM, true, G, S>{g, st, ax, eta});
      return f(Target<A::EF21_SGDM, false, G, S>{g, st, ax, eta});
    case A::EF:
      if (on_the_fly) return f(Target<A::EF, true, G, S>{g, st, ax, eta});
      return f(Target<A::EF, false, G, S>{g, st, ax, eta});
    default: return f(Target<A::PLAIN, false, G, S>{g, st, ax, eta});
  }
}

template <typename G, typename S>
at::Tensor compress_kernel(Algorithm algo, const at::Tensor& grad, S* st, S* ax, int64_t k, double momentum,
                           const std::optional<at::Tensor>& indices, at::ScalarType value_dtype, bool update) {
  const int64_t d = grad.numel();
  const G* g = grad.const_data_ptr<G>();
  const S eta = static_cast<S>(momentum);

  // Materialise the target where it is state anyway (v for ef21-sgdm, e for ef), unless the
  // update is deferred to commit_.
  if (update) materialise(algo, g, st, ax, eta, d);

  const bool packed = !indices.has_value();
  const int64_t vbytes = c10::elementSize(value_dtype);
  at::Tensor msg = packed ? at::empty({packed_bytes(k, vbytes)}, grad.options().dtype(at::kByte))
                          : at::empty({k}, grad.options().dtype(value_dtype));
  // The message's first bytes (allocator-aligned) or the given indices.
  int32_t* idx = packed ? reinterpret_cast<int32_t*>(msg.data_ptr<uint8_t>()) : indices->data_ptr<int32_t>();
  uint8_t* vals = static_cast<uint8_t*>(msg.data_ptr()) + (packed ? 4 * k : 0);
  with_target(algo, !update, g, st, ax, eta, [&](const auto& value) {
    if (packed) select_topk_abs<S>(d, k, value, idx);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value_dtype, "compress_values", [&] {
      using W = scalar_t;
      at::parallel_for(0, k, kGrain, [&](int64_t lo, int64_t hi) {
        for (int64_t j = lo; j < hi; ++j) {
          const int64_t i = idx[j];
          const W w = static_cast<W>(value(i));
          const S c = static_cast<S>(w);
          store<W>(vals, j, w);
          if (!update) continue;
          if (algo == Algorithm::EF21 || algo == Algorithm::EF21_SGDM) st[i] += c;
          else if (algo == Algorithm::EF) st[i] -= c;
        }
      });
    });
  });
  return msg;
}

// The shared checks, and the index values, which are cheap to read on the CPU: the kernels write
// the state at these places, so anything that would write out of bounds is refused first.
std::pair<Algorithm, at::ScalarType> check_step_args_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& state,
                                                         const std::optional<at::Tensor>& aux,
                                                         c10::string_view algorithm, int64_t k,
                                                         const std::optional<at::Tensor>& indices,
                                                         at::ScalarType value_dtype, const char* op) {
  TORCH_CHECK(grad.device() == kCpu, "grad must be on ", kCpu, ", got ", grad.device());
  const auto checked = check_step_args(grad, state, aux, algorithm, k, indices, value_dtype, op);
  if (indices.has_value()) {
    const int64_t d = grad.numel();
    const int32_t* ix = indices->const_data_ptr<int32_t>();
    for (int64_t j = 0; j < k; ++j)
      TORCH_CHECK(ix[j] >= 0 && ix[j] < d && (j == 0 || ix[j] > ix[j - 1]),
                  "indices must be strictly ascending in [0, ", d, "), got indices[", j, "]=", ix[j]);
  }
  return checked;
}

// Reads the verdict flag of commit_ / aggregate_ (a CPU tensor: no synchronisation).
bool ok_value(const std::optional<at::Tensor>& ok) {
  if (!ok.has_value()) return true;
  check_ok(*ok, kCpu);
  return *ok->const_data_ptr<bool>();
}

at::Tensor compress_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& state,
                        const std::optional<at::Tensor>& aux, c10::string_view algorithm, int64_t k,
                        double momentum, const std::optional<at::Tensor>& indices, at::ScalarType value_dtype,
                        bool update_state) {
  const auto [algo, sdt] = check_step_args_cpu(grad, state, aux, algorithm, k, indices, value_dtype, "compress_");
  const bool needs_state = algo != Algorithm::PLAIN;
  const bool needs_aux = algo == Algorithm::EF21_SGDM;
  at::Tensor msg;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "compress_", [&] {
    using G = scalar_t;
    auto with_state = [&](auto s_tag) {
      using S = decltype(s_tag);
      S* st = needs_state ? state->data_ptr<S>() : nullptr;
      S* ax = needs_aux ? aux->data_ptr<S>() : nullptr;
      msg = compress_kernel<G, S>(algo, grad, st, ax, k, momentum, indices, value_dtype, update_state);
    };
    if (sdt == at::kDouble) with_state(double{});
    else with_state(float{});
  });
  return msg;
}


// Refuses indices that would write out of bounds, before anything is written.
void check_indices(const Messages& m, int64_t d, const char* op) {
  std::atomic<bool> bad{false};
  at::parallel_for(0, m.n, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* ix = m.idx(r);
      int64_t prev = -1;
      for (int64_t j = 0; j < m.k; ++j) {
        const int64_t i = load<int32_t>(ix, j);
        if (i <= prev || i >= d) bad = true;
        prev = i;
      }
    }
  });
  TORCH_CHECK(!bad, op, ": a message holds indices that are not strictly ascending in [0, ", d, ")");
}

template <typename O, typename W>
void apply_messages(O* out, int64_t d, const Messages& m, double scale) {
  using acc = std::conditional_t<std::is_same_v<O, double>, double, float>;
  const acc s = static_cast<acc>(scale);
  // Each thread owns a range of `out` and applies the messages in row order: deterministic.
  at::parallel_for(0, d, std::max<int64_t>(kGrain, d / std::max(1, at::get_num_threads())), [&](int64_t lo, int64_t hi) {
    for (int64_t r = 0; r < m.n; ++r) {
      const uint8_t* ix = m.idx(r);
      const uint8_t* v = m.vals(r);
      int64_t j = 0, hi_j = m.k;  // first j with ix[j] >= lo (the indices ascend)
      while (j < hi_j) {
        const int64_t mid = (j + hi_j) / 2;
        if (load<int32_t>(ix, mid) < lo) j = mid + 1;
        else hi_j = mid;
      }
      for (; j < m.k; ++j) {
        const int64_t i = load<int32_t>(ix, j);
        if (i >= hi) break;
        out[i] = static_cast<O>(static_cast<acc>(out[i]) + s * static_cast<acc>(load<W>(v, j)));
      }
    }
  });
}

at::Tensor& aggregate_cpu(at::Tensor& out, const at::Tensor& messages, int64_t k, at::ScalarType value_dtype,
                          double scale, const std::optional<at::Tensor>& indices, const std::optional<at::Tensor>& ok) {
  check_flat(out, "out", kCpu);
  const Messages m = messages_of(messages, k, value_dtype, indices, kCpu);
  check_indices(m, out.numel(), "aggregate_");
  if (!ok_value(ok)) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "aggregate_", [&] {
    using O = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value_dtype, "aggregate_values", [&] {
      apply_messages<O, scalar_t>(out.data_ptr<O>(), out.numel(), m, scale);
    });
  });
  return out;
}

void commit_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& state, const std::optional<at::Tensor>& aux,
                const at::Tensor& message, c10::string_view algorithm, int64_t k, double momentum,
                const std::optional<at::Tensor>& indices, at::ScalarType value_dtype,
                const std::optional<at::Tensor>& ok) {
  const auto [algo, sdt] = check_step_args_cpu(grad, state, aux, algorithm, k, indices, value_dtype, "commit_");
  TORCH_CHECK(message.dim() == 1, "message must be 1-D (as compress_ returns it), got ", message.dim(), "-D");
  const Messages m = messages_of(message.view({1, message.numel()}), k, value_dtype, indices, kCpu);
  const int64_t d = grad.numel();
  check_indices(m, d, "commit_");
  if (algo == Algorithm::PLAIN || !ok_value(ok)) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "commit_", [&] {
    using G = scalar_t;
    auto with_state = [&](auto s_tag) {
      using S = decltype(s_tag);
      S* st = state->data_ptr<S>();
      S* ax = algo == Algorithm::EF21_SGDM ? aux->data_ptr<S>() : nullptr;
      materialise(algo, grad.const_data_ptr<G>(), st, ax, static_cast<S>(momentum), d);
      // g_i += c (ef21, ef21-sgdm) or e -= c (ef): x + 1*c and x + (-1)*c round as x + c and x - c.
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value_dtype, "commit_values", [&] {
        apply_messages<S, scalar_t>(st, d, m, algo == Algorithm::EF ? -1.0 : 1.0);
      });
    };
    if (sdt == at::kDouble) with_state(double{});
    else with_state(float{});
  });
}

at::Tensor& all_finite_cpu(at::Tensor& ok, const at::Tensor& messages, int64_t k, at::ScalarType value_dtype) {
  ok_value(ok);  // checks its type and device
  const Messages m = messages_of(messages, k, value_dtype, std::nullopt, kCpu);
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value_dtype, "all_finite_", [&] {
    using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    at::parallel_for(0, m.n, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = 0; j < m.k; ++j)
          if (!std::isfinite(static_cast<acc>(load<scalar_t>(m.vals(r), j)))) bad = true;
    });
  });
  if (bad) *ok.data_ptr<bool>() = false;
  return ok;
}

void rescale_cpu(at::TensorList tensors, const at::Tensor& scale, const at::Tensor& seen) {
  for (const auto* t : {&scale, &seen}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == 1 && t->device().is_cpu(),
                "scale and seen must be one float32 each on the CPU, got ", t->scalar_type(), " with ", t->numel(),
                " elements on ", t->device());
  }
  const float s = *scale.const_data_ptr<float>(), z = *seen.const_data_ptr<float>();
  if (s == z) return;
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), "tensors must be on the CPU, got ", t.device());
    // The ratio is formed in the tensor's dtype, as the CUDA kernel does; a power of two is exact.
    if (t.scalar_type() == at::kDouble) t.mul_(static_cast<double>(s) / static_cast<double>(z));
    else if (t.scalar_type() == at::kFloat) t.mul_(static_cast<double>(s / z));
    else TORCH_CHECK(false, "tensors must be float32 or float64, got ", t.scalar_type());
  }
  *seen.data_ptr<float>() = s;
}

}  // namespace

TORCH_LIBRARY_IMPL(ef21, CPU, m) {
  m.impl("topk_abs", &topk_abs_cpu);
  m.impl("compress_", &compress_cpu);
  m.impl("commit_", &commit_cpu);
  m.impl("aggregate_", &aggregate_cpu);
  m.impl("all_finite_", &all_finite_cpu);
  m.impl("rescale_", &rescale_cpu);
}

}  // namespace ef21::cpu

// Every ef21 operator schema, declared once. Backends register implementations per dispatch key
// (cpu/ops_cpu.cpp, cuda/ops_cuda.cu), so the dispatcher picks the device and names missing ones.
#include <torch/library.h>

TORCH_LIBRARY(ef21, m) {
  // Exact Top-k of |x| on a 1-D tensor; ties go to the lower index. Returns int32 indices in
  // ascending order and the values x[indices].
  m.def("topk_abs(Tensor x, int k) -> (Tensor indices, Tensor values)");

  // One compression step on a flat gradient (the fused EF21 step and its variants):
  //   ef21      p = grad - g_i;                          c = C(p); g_i += c
  //   ef21-sgdm v = (1-eta) v + eta grad; p = v - g_i;   c = C(p); g_i += c   (state=g_i, aux=v)
  //   ef        p = grad + e;                            c = C(p); e = p - c  (state=e)
  //   plain     p = grad;                                c = C(p)
  // C is Top-k of |p| unless `indices` (sorted, int32) fixes the support (Rand-k). c is rounded to
  // value_dtype before the state update, so the state tracks exactly what the other ranks receive.
  // Returns the message: packed uint8 [k int32 indices | k values] for Top-k, or the k values
  // alone (in value_dtype) when `indices` is given. With update_state=False, state and aux are
  // only read (the same message) and commit_ applies the update later.
  m.def(
      "compress_(Tensor grad, Tensor(a!)? state, Tensor(b!)? aux, str algorithm, int k, float momentum, "
      "Tensor? indices, ScalarType value_dtype, bool update_state=True) -> Tensor");

  // The state update of compress_, from the message compress_(..., update_state=False) returned
  // for the same grad and state, bit for bit what compress_(..., update_state=True) does:
  //   ef21 g_i += c;  ef21-sgdm v = (1-eta) v + eta grad, g_i += c;  ef e = e + grad - c;  plain -.
  // Nothing changes when `ok` (one bool, on the state's device, read there) is false: the hook
  // sends first and commits once every rank's message is known to be finite.
  m.def(
      "commit_(Tensor grad, Tensor(a!)? state, Tensor(b!)? aux, Tensor message, str algorithm, int k, "
      "float momentum, Tensor? indices, ScalarType value_dtype, Tensor? ok=None) -> ()");

  // out[idx] += scale * value for each message in row order (rank order), no atomics, so every
  // rank that applies the same messages gets bitwise the same `out`. messages: uint8 [n, bytes]
  // packed by compress_, or [n, k] values (in value_dtype) for the shared `indices`. Nothing
  // changes when `ok` (one bool, on out's device, read there) is false.
  m.def(
      "aggregate_(Tensor(a!) out, Tensor messages, int k, ScalarType value_dtype, float scale, "
      "Tensor? indices, Tensor? ok=None) -> Tensor(a!)");

  // ok &= every value in the packed messages (uint8 [n, k * (4 + value bytes)]) is finite. A rank
  // whose gradient overflowed sends inf/NaN (Top-k always selects them), so after the exchange
  // every rank reaches the same verdict without a host synchronisation.
  m.def("all_finite_(Tensor(a!) ok, Tensor messages, int k, ScalarType value_dtype) -> Tensor(a!)");

  // Loss-scale tracking for state kept in scaled-gradient units: when scale != seen, every tensor
  // is multiplied by scale / seen (formed in its dtype), then seen = scale. scale and seen are
  // one float32 each, on the tensors' device, read there: no host synchronisation.
  m.def("rescale_(Tensor(a!)[] tensors, Tensor scale, Tensor(b!) seen) -> ()");
}

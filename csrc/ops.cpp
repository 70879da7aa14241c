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
  // alone (in value_dtype) when `indices` is given.
  m.def(
      "compress_(Tensor grad, Tensor(a!)? state, Tensor(b!)? aux, str algorithm, int k, float momentum, "
      "Tensor? indices, ScalarType value_dtype) -> Tensor");

  // out[idx] += scale * value for each message in row order (rank order), no atomics, so every
  // rank that applies the same messages gets bitwise the same `out`. messages: uint8 [n, bytes]
  // packed by compress_, or [n, k] values (in value_dtype) for the shared `indices`.
  m.def(
      "aggregate_(Tensor(a!) out, Tensor messages, int k, ScalarType value_dtype, float scale, "
      "Tensor? indices) -> Tensor(a!)");
}

// Baseline for benchmarks/topk_cpu.py: exact Top-k of |x| with std::nth_element.
//
// Selects on a copy of the values only (not (value, index) pairs), which is the fastest way to use
// nth_element here: one pass to copy |x|, the selection, then one pass to collect the indices of
// the elements above the threshold and the first ones equal to it (ties to the lower index, as in
// ef21). Indices come out ascending, like torch.ops.ef21.topk_abs. Finite float32, single thread.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>

torch::Tensor topk_abs_nth_element(const torch::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous() && x.scalar_type() == torch::kFloat,
              "x must be a contiguous 1-D float32 tensor");
  const int64_t d = x.numel();
  TORCH_CHECK(k >= 1 && k <= d, "k=", k, " is out of range for d=", d);
  const float* p = x.const_data_ptr<float>();
  std::unique_ptr<float[]> a(new float[d]);  // uninitialised: the copy below is its only fill
  for (int64_t i = 0; i < d; ++i) a[i] = std::fabs(p[i]);
  std::nth_element(a.get(), a.get() + (k - 1), a.get() + d, std::greater<float>());
  const float t = a[k - 1];
  int64_t above = 0;  // after nth_element, everything > t lies in a[0, k - 1)
  for (int64_t i = 0; i < k - 1; ++i) above += a[i] > t;
  int64_t ties = k - above;
  torch::Tensor out = torch::empty({k}, x.options().dtype(torch::kInt));
  int32_t* o = out.data_ptr<int32_t>();
  for (int64_t i = 0; i < d; ++i) {
    const float v = std::fabs(p[i]);
    if (v > t || (v == t && ties-- > 0)) *o++ = static_cast<int32_t>(i);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("topk_abs", &topk_abs_nth_element, "Top-k of |x| by std::nth_element (ascending indices)");
}

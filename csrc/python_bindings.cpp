// The one pybind11 file: the hook core for Python, and registration on DDP's C++ reducer.
// Built against torch's bundled pybind11, so torch's Reducer, ProcessGroup and GradBucket
// objects cast to their C++ types here.
#include <torch/csrc/distributed/c10d/reducer.hpp>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/extension.h>

#include "hook/ef21_hook.h"
#include "hook/randk.h"

namespace py = pybind11;
using ef21::EF21Core;

namespace {

py::dict state_dict_of(const EF21Core::ParamState& ps) {
  py::dict d;  // copies, in unscaled gradient units
  if (ps.state.defined()) d["state"] = ps.state;
  if (ps.aux.defined()) d["aux"] = ps.aux;
  if (ps.g.defined()) d["g"] = ps.g;
  d["initialized"] = ps.initialized;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ef21 C++ core: EF21 error feedback as a DDP communication hook";

  py::class_<EF21Core, std::shared_ptr<EF21Core>>(m, "Core")
      .def(py::init([](const c10::intrusive_ptr<c10d::ProcessGroup>& pg, std::string algorithm,
                       std::string compressor, double ratio, int64_t k, double momentum, std::string init,
                       at::ScalarType value_dtype, int64_t seed) {
             ef21::HookConfig cfg{std::move(algorithm), std::move(compressor), ratio, k, momentum,
                                  std::move(init), value_dtype, seed};
             return std::make_shared<EF21Core>(pg, std::move(cfg));
           }),
           py::arg("process_group"), py::arg("algorithm"), py::arg("compressor"), py::arg("ratio"), py::arg("k"),
           py::arg("momentum"), py::arg("init"), py::arg("value_dtype"), py::arg("seed"))
      .def("run",
           [](EF21Core& self, c10d::GradBucket& bucket) {
             c10::intrusive_ptr<c10::ivalue::Future> fut;
             {
               py::gil_scoped_release no_gil;
               fut = self.run(bucket);
             }
             return std::make_shared<torch::jit::PythonFutureWrapper>(fut);
           })
      .def("stats", &EF21Core::stats)
      .def("reset_stats", &EF21Core::reset_stats)
      .def("bucket_params", &EF21Core::bucket_params)
      .def("units", &EF21Core::units)
      .def("set_units", &EF21Core::set_units)
      .def("params", &EF21Core::params)
      .def("param_state", [](const EF21Core& self, const at::Tensor& p) { return state_dict_of(self.param_state(p)); })
      .def("set_param_state",
           [](EF21Core& self, const at::Tensor& p, std::optional<at::Tensor> state, std::optional<at::Tensor> aux,
              std::optional<at::Tensor> g, bool initialized) {
             self.set_param_state(p, state.value_or(at::Tensor()), aux.value_or(at::Tensor()),
                                  g.value_or(at::Tensor()), initialized);
           })
      .def("reinitialize", &EF21Core::reinitialize)
      .def("set_loss_scale", &EF21Core::set_loss_scale)
      .def("check_replicas",
           [](EF21Core& self, const at::Device& device) {
             py::gil_scoped_release no_gil;
             self.check_replicas(device);
           })
      .def_property("check_every", &EF21Core::check_every, &EF21Core::set_check_every)
      .def_property_readonly("world_size", &EF21Core::world_size)
      .def_property_readonly("rank", &EF21Core::rank)
      .def_property("steps", &EF21Core::steps, &EF21Core::set_steps);

  m.def(
      "register_comm_hook",
      [](py::object reducer, std::shared_ptr<EF21Core> core) {
        auto& r = reducer.cast<c10d::Reducer&>();
        r.register_comm_hook(std::make_unique<ef21::EF21CommHook>(std::move(core)));
      },
      "Registers the EF21 hook on a DDP model's C++ reducer (ddp_model.reducer).");
  m.def("k_for", &ef21::k_for, py::arg("numel"), py::arg("ratio"), py::arg("k") = 0);
  m.def(
      "randk_indices", [](int64_t d, int64_t k, uint64_t seed) { return ef21::randk_indices(d, k, seed); },
      py::arg("d"), py::arg("k"), py::arg("seed"));
  m.def("built_with_cuda", []() {
#ifdef EF21_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}

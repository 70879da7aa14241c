// The EF21 communication hook: per-parameter state, one collective per bucket, and the
// c10d::CommHookInterface that DDP's reducer calls. The maths lives in the ef21 operators
// (ops.cpp); this file decides what to send, how, and where the state lives.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "../algorithm.h"

namespace ef21 {

struct HookConfig {
  std::string algorithm = "ef21";
  std::string compressor = "topk";  // topk | randk | identity
  double ratio = 0.01;
  int64_t k = 0;  // > 0 overrides ratio
  double momentum = 0.1;
  std::string init = "full";  // full | compressed | zero
  at::ScalarType value_dtype = at::kFloat;
  int64_t seed = 0;
};

// Elements sent per compression unit of `numel` elements: max(1, ceil(ratio * numel)) with the
// product snapped to an integer within float rounding (4/123 of 123 is 4), or `k`; at most numel.
int64_t k_for(int64_t numel, double ratio, int64_t k);

// Ring-algorithm bytes one rank sends: allgather of m bytes each, allreduce of m bytes.
inline int64_t allgather_bytes(int64_t n, int64_t m) { return (n - 1) * m; }
inline int64_t allreduce_bytes(int64_t n, int64_t m) { return 2 * (n - 1) * m / n; }

class EF21Core {
 public:
  // A parameter's state: views into the flat state of the bucket that holds it now.
  struct ParamState {
    at::Tensor param;  // keeps the key alive
    at::Tensor state;  // g_i (ef21, ef21-sgdm) or e (ef)
    at::Tensor aux;    // v (ef21-sgdm)
    at::Tensor g;      // the shared estimate g (ef21, ef21-sgdm): identical on every rank
    bool initialized = false;
    const void* owner = nullptr;
  };

  EF21Core(c10::intrusive_ptr<c10d::ProcessGroup> pg, HookConfig cfg);

  c10::intrusive_ptr<c10::ivalue::Future> run(c10d::GradBucket& bucket);

  std::map<std::string, double> stats() const;
  void reset_stats();
  // Parameters of each bucket of the last step, by bucket index, in buffer order.
  std::vector<std::vector<at::Tensor>> bucket_params() const;
  // Parameters in the order first seen, and their state (for checkpoints).
  std::vector<at::Tensor> params() const;
  ParamState param_state(const at::Tensor& param) const;
  void set_param_state(const at::Tensor& param, const at::Tensor& state, const at::Tensor& aux,
                       const at::Tensor& g, bool initialized);
  const HookConfig& config() const { return cfg_; }
  int64_t world_size() const { return world_; }
  int64_t rank() const { return rank_; }
  int64_t steps() const;
  void set_steps(int64_t steps);

 private:
  struct Layout {
    std::vector<c10::TensorImpl*> params;
    std::vector<int64_t> offsets, lengths;
    int64_t numel = 0;
    at::Tensor state, aux, g;  // flat, fp32 (fp64 for fp64 buckets)
  };

  std::shared_ptr<Layout> layout_for(c10d::GradBucket& bucket);
  ParamState& state_of(const at::Tensor& param);
  void count(int64_t sent, int64_t dense, const char* path, double seconds);

  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  HookConfig cfg_;
  Algorithm algo_;
  int64_t world_, rank_;

  std::unordered_map<c10::TensorImpl*, ParamState> states_;
  std::vector<c10::TensorImpl*> order_;
  std::map<size_t, std::shared_ptr<Layout>> layouts_;

  mutable std::mutex mu_;  // guards the counters below (callbacks run on communication threads)
  int64_t steps_ = 0, calls_ = 0, bytes_sent_ = 0, dense_bytes_ = 0;
  int64_t sparse_buckets_ = 0, dense_buckets_ = 0, init_buckets_ = 0;
  double hook_seconds_ = 0.0;
};

// What DDP's reducer holds: forwards to a core shared with the Python-side state object.
class EF21CommHook : public c10d::CommHookInterface {
 public:
  explicit EF21CommHook(std::shared_ptr<EF21Core> core) : core_(std::move(core)) {}
  c10::intrusive_ptr<c10::ivalue::Future> runHook(c10d::GradBucket& bucket) override { return core_->run(bucket); }
  at::Tensor parseHookResult(const c10::IValue& result) override;

 private:
  std::shared_ptr<EF21Core> core_;
};

}  // namespace ef21

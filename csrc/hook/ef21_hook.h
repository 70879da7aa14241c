// The EF21 communication hook: per-parameter state grouped in compression units, one collective
// per bucket, and the c10d::CommHookInterface that DDP's reducer calls. The maths lives in the
// ef21 operators (ops.cpp); this file decides what to send, how, and where the state lives.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>

#include <functional>
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
  // A compression unit: the parameters Top-k selects over together (those of a DDP bucket as it
  // was when the unit was formed), with their state end to end in unit order.
  struct Unit {
    std::vector<c10::TensorImpl*> params;
    std::vector<int64_t> offsets, lengths;  // in the flat state
    int64_t numel = 0;
    int64_t index = 0;         // the bucket index it was formed from: seeds Rand-k
    at::Tensor state, aux, g;  // flat, fp32 (fp64 for fp64 buckets)
    at::Tensor seen;           // loss scale the state is expressed in (undefined: 1)
    bool retired = false;      // a parameter moved to another unit: never used whole again
  };

  // A parameter's state: views into its unit's flat state.
  struct ParamState {
    at::Tensor param;  // keeps the key alive
    at::Tensor state;  // g_i (ef21, ef21-sgdm) or e (ef)
    at::Tensor aux;    // v (ef21-sgdm)
    at::Tensor g;      // the shared estimate g (ef21, ef21-sgdm): identical on every rank
    bool initialized = false;
    std::shared_ptr<Unit> unit;
  };

  EF21Core(c10::intrusive_ptr<c10d::ProcessGroup> pg, HookConfig cfg);

  c10::intrusive_ptr<c10::ivalue::Future> run(c10d::GradBucket& bucket);

  std::map<std::string, double> stats() const;
  void reset_stats();
  // Parameters of each bucket of the last step, by bucket index, in buffer order.
  std::vector<std::vector<at::Tensor>> bucket_params() const;
  // The compression units that hold state, as (index, parameters in unit order).
  std::vector<std::pair<int64_t, std::vector<at::Tensor>>> units() const;
  // Replaces the units (checkpoint restore); states already set are carried over, unscaled.
  void set_units(const std::vector<std::pair<int64_t, std::vector<at::Tensor>>>& units);
  // Parameters in the order first seen, and their state in unscaled units (for checkpoints).
  std::vector<at::Tensor> params() const;
  ParamState param_state(const at::Tensor& param) const;
  void set_param_state(const at::Tensor& param, const at::Tensor& state, const at::Tensor& aux,
                       const at::Tensor& g, bool initialized);
  // Forgets every g_i, v, e and g: the next synced step initialises again (init="full": dense).
  void reinitialize();
  // The loss scale of a torch.amp.GradScaler (its one-element tensor, updated in place): the state
  // is kept in scaled-gradient units and follows the scale when it changes.
  void set_loss_scale(const at::Tensor& scale);
  // Every `every` synced steps (0: never), check that g is bitwise identical on every rank.
  void set_check_every(int64_t every) { check_every_ = every; }
  int64_t check_every() const { return check_every_; }
  // A collective: raises, naming the ranks, if g differs across ranks. Call it on every rank.
  void check_replicas(const at::Device& device);
  const HookConfig& config() const { return cfg_; }
  int64_t world_size() const { return world_; }
  int64_t rank() const { return rank_; }
  int64_t steps() const;
  void set_steps(int64_t steps);

 private:
  // Where a unit's parameters lie in a bucket's buffer.
  struct Part {
    std::shared_ptr<Unit> unit;
    std::vector<int64_t> bucket_offsets;  // per unit parameter
    int64_t base = -1;                    // >= 0: the unit is buffer[base : base + numel] as is
  };
  // How a bucket is compressed: one part per unit it holds (usually exactly one).
  struct Plan {
    std::vector<c10::TensorImpl*> params;
    std::vector<Unit*> units;  // of each parameter, when the plan was made
    std::vector<int64_t> offsets, lengths;
    int64_t numel = 0;
    std::vector<Part> parts;
  };

  // The buckets of one synced step: their results are handed to DDP together, once every
  // bucket's messages are in, so a non-finite gradient anywhere skips the whole step everywhere.
  struct StepBarrier;
  // Finishes a bucket given the step's verdict (one bool on the device): commits its state and
  // writes its result (NaN when the step is skipped) into the bucket buffer.
  using Finish = std::function<void(const at::Tensor& ok)>;

  c10::intrusive_ptr<c10::ivalue::Future> run_bucket(c10d::GradBucket& bucket, uint64_t step,
                                                     const std::shared_ptr<StepBarrier>& barrier);
  // `checked` yields the bucket's own verdict once its collective is done.
  c10::intrusive_ptr<c10::ivalue::Future> enqueue(const std::shared_ptr<StepBarrier>& barrier,
                                                  const c10::intrusive_ptr<c10::ivalue::Future>& checked,
                                                  Finish finish, const at::Tensor& buffer, bool last);
  static void finish_step(const std::shared_ptr<StepBarrier>& barrier);
  std::shared_ptr<Plan> plan_for(c10d::GradBucket& bucket);
  std::shared_ptr<Unit> make_unit(const std::vector<at::Tensor>& params, int64_t index, at::ScalarType dtype,
                                  at::Device device);
  void follow_loss_scale(Unit& unit);
  ParamState& state_of(const at::Tensor& param);
  // A part's slice of a bucket-ordered flat tensor, in unit order (a view when it lies there as is).
  static at::Tensor gather(const Part& part, const at::Tensor& flat);
  // out's part = unit_flat * factor (factor: 1, or NaN for a skipped step), in bucket order.
  static void scatter(const Part& part, const at::Tensor& unit_flat, at::Tensor& out, const at::Tensor& factor);
  void count(int64_t sent, int64_t dense, const char* path, double seconds);

  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  HookConfig cfg_;
  Algorithm algo_;
  int64_t world_, rank_;
  int64_t check_every_ = 0;
  at::Tensor loss_scale_;

  std::unordered_map<c10::TensorImpl*, ParamState> states_;
  std::vector<c10::TensorImpl*> order_;
  std::map<size_t, std::shared_ptr<Plan>> plans_;
  bool in_step_ = false;  // a bucket of the current step has run
  std::shared_ptr<StepBarrier> barrier_;  // of the current step

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

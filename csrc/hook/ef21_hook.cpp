#include "ef21_hook.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <chrono>
#include <cmath>

#include "randk.h"

namespace ef21 {
namespace {

using Future = c10::ivalue::Future;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The hook reaches the kernels through the dispatcher, so one hook serves every device.
at::Tensor call_compress(const at::Tensor& grad, const std::optional<at::Tensor>& state,
                         const std::optional<at::Tensor>& aux, const std::string& algorithm, int64_t k,
                         double momentum, const std::optional<at::Tensor>& indices, at::ScalarType vdtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ef21::compress_", "")
                       .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, c10::string_view, int64_t, double,
                                         const std::optional<at::Tensor>&, at::ScalarType)>();
  return op.call(grad, state, aux, algorithm, k, momentum, indices, vdtype);
}

void call_aggregate(at::Tensor& out, const at::Tensor& messages, int64_t k, at::ScalarType vdtype, double scale,
                    const std::optional<at::Tensor>& indices) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ef21::aggregate_", "")
                       .typed<at::Tensor&(at::Tensor&, const at::Tensor&, int64_t, at::ScalarType, double,
                                          const std::optional<at::Tensor>&)>();
  op.call(out, messages, k, vdtype, scale, indices);
}

c10::intrusive_ptr<Future> completed(const at::Tensor& t) {
  auto fut = c10::make_intrusive<Future>(c10::TensorType::get());
  fut->markCompleted(c10::IValue(t));
  return fut;
}

}  // namespace

int64_t k_for(int64_t numel, double ratio, int64_t k) {
  if (k > 0) return std::max<int64_t>(1, std::min(k, numel));
  const double x = ratio * static_cast<double>(numel);
  const double nearest = std::round(x);
  const double kk = std::abs(x - nearest) <= 1e-9 * std::max(1.0, x) ? nearest : std::ceil(x);
  return std::max<int64_t>(1, std::min(static_cast<int64_t>(kk), numel));
}

EF21Core::EF21Core(c10::intrusive_ptr<c10d::ProcessGroup> pg, HookConfig cfg)
    : pg_(std::move(pg)), cfg_(std::move(cfg)), algo_(parse_algorithm(cfg_.algorithm)) {
  TORCH_CHECK(pg_, "process_group must not be None here");
  TORCH_CHECK(cfg_.compressor == "topk" || cfg_.compressor == "randk" || cfg_.compressor == "identity",
              "compressor='", cfg_.compressor, "' is not supported; allowed: 'topk', 'randk', 'identity'");
  TORCH_CHECK(cfg_.init == "full" || cfg_.init == "compressed" || cfg_.init == "zero",
              "init='", cfg_.init, "' is not supported; allowed: 'full', 'compressed', 'zero'");
  world_ = pg_->getSize();
  rank_ = pg_->getRank();
}

EF21Core::ParamState& EF21Core::state_of(const at::Tensor& param) {
  auto* key = param.unsafeGetTensorImpl();
  auto it = states_.find(key);
  if (it == states_.end()) {
    it = states_.emplace(key, ParamState{}).first;
    it->second.param = param;
    order_.push_back(key);
  }
  return it->second;
}

// The flat state of a bucket, rebuilt whenever DDP's buckets change: state is kept per parameter,
// so a rebuild only copies each parameter's slice to its new place.
std::shared_ptr<EF21Core::Layout> EF21Core::layout_for(c10d::GradBucket& bucket) {
  const at::Tensor& buffer = bucket.getBuffer();
  const auto params = bucket.getParameters();
  const auto grads = bucket.getGradients();
  std::vector<int64_t> offsets, lengths;
  for (const auto& gr : grads) {
    offsets.push_back(gr.storage_offset() - buffer.storage_offset());
    lengths.push_back(gr.numel());
  }
  auto& cached = layouts_[bucket.getIndex()];
  if (cached && cached->numel == buffer.numel() && cached->offsets == offsets && cached->lengths == lengths &&
      cached->params.size() == params.size()) {
    bool same = true;
    for (size_t j = 0; j < params.size() && same; ++j) {
      same = cached->params[j] == params[j].unsafeGetTensorImpl() &&
             state_of(params[j]).owner == static_cast<const void*>(cached.get());
    }
    if (same) return cached;
  }

  auto layout = std::make_shared<Layout>();
  layout->numel = buffer.numel();
  layout->offsets = offsets;
  layout->lengths = lengths;
  const auto opts = buffer.options().dtype(buffer.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const bool has_state = algo_ != Algorithm::PLAIN && algo_ != Algorithm::DENSE;
  if (has_state) layout->state = at::zeros({layout->numel}, opts);
  if (algo_ == Algorithm::EF21_SGDM) layout->aux = at::zeros({layout->numel}, opts);
  if (keeps_estimate(algo_)) layout->g = at::zeros({layout->numel}, opts);
  auto move = [](at::Tensor& slot, const at::Tensor& flat, int64_t off, int64_t len) {
    if (!flat.defined()) return;
    at::Tensor view = flat.narrow(0, off, len);
    if (slot.defined() && slot.numel() == len) view.copy_(slot.reshape({len}));
    slot = view;
  };
  for (size_t j = 0; j < params.size(); ++j) {
    layout->params.push_back(params[j].unsafeGetTensorImpl());
    ParamState& ps = state_of(params[j]);
    move(ps.state, layout->state, offsets[j], lengths[j]);
    move(ps.aux, layout->aux, offsets[j], lengths[j]);
    move(ps.g, layout->g, offsets[j], lengths[j]);
    ps.owner = layout.get();
  }
  cached = layout;
  return layout;
}

c10::intrusive_ptr<Future> EF21Core::run(c10d::GradBucket& bucket) {
  const auto t0 = Clock::now();
  at::Tensor buffer = bucket.getBuffer();
  TORCH_CHECK(buffer.is_contiguous() && buffer.dim() == 1, "ef21: the bucket buffer must be flat and contiguous");
  TORCH_CHECK(at::isFloatingType(buffer.scalar_type()), "ef21: gradients must be floating point, got ",
              buffer.scalar_type(), " (complex parameters are not supported)");
  const int64_t n = world_, d = buffer.numel();
  const int64_t dense_bytes = allreduce_bytes(n, d * static_cast<int64_t>(buffer.element_size()));
  uint64_t step;
  {
    std::lock_guard<std::mutex> lock(mu_);
    step = static_cast<uint64_t>(steps_);
    if (bucket.isLast()) ++steps_;
    ++calls_;
  }
  const double inv_n = 1.0 / static_cast<double>(n);
  auto finish = [this, dense_bytes](int64_t sent, const char* path, Clock::time_point start) {
    count(sent, dense_bytes, path, seconds_since(start));
  };

  if (algo_ == Algorithm::DENSE) {
    std::vector<at::Tensor> ts{buffer};
    auto work = pg_->allreduce(ts);
    finish(allreduce_bytes(n, d * buffer.element_size()), "dense", t0);
    return work->getFuture()->then(
        [this, buffer, inv_n, dense_bytes](Future& f) {
          const auto t1 = Clock::now();
          f.value();
          buffer.mul_(inv_n);
          count(0, 0, nullptr, seconds_since(t1));
          return c10::IValue(buffer);
        },
        c10::TensorType::get());
  }

  auto layout = layout_for(bucket);
  std::vector<ParamState*> members;
  bool initialized = true;
  for (const auto& p : bucket.getParameters()) {
    members.push_back(&state_of(p));
    initialized = initialized && members.back()->initialized;
  }
  for (auto* ps : members) ps->initialized = true;

  if (keeps_estimate(algo_) && !initialized) {
    if (cfg_.init == "zero") {  // g_i = g = 0 (and v = 0): this step applies nothing
      layout->state.zero_();
      layout->g.zero_();
      if (layout->aux.defined()) layout->aux.zero_();
      buffer.zero_();
      finish(0, "init", t0);
      return completed(buffer);
    }
    if (cfg_.init == "full") {  // one dense step: g_i = grad_i (v_i = grad_i), g = mean_i grad_i
      layout->state.copy_(buffer);
      if (layout->aux.defined()) layout->aux.copy_(buffer);
      at::Tensor sum = buffer.to(layout->g.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
      std::vector<at::Tensor> ts{sum};
      auto work = pg_->allreduce(ts);
      finish(allreduce_bytes(n, d * sum.element_size()), "init", t0);
      return work->getFuture()->then(
          [this, layout, sum, buffer, inv_n](Future& f) {
            const auto t1 = Clock::now();
            f.value();
            layout->g.copy_(sum.mul_(inv_n));
            buffer.copy_(layout->g);
            count(0, 0, nullptr, seconds_since(t1));
            return c10::IValue(buffer);
          },
          c10::TensorType::get());
    }
    // "compressed": g_i = g = 0 (v_i = grad_i), then an ordinary step gives g_i = C(grad_i).
    layout->state.zero_();
    layout->g.zero_();
    if (layout->aux.defined()) layout->aux.copy_(buffer);
  }

  const at::ScalarType vdtype = cfg_.value_dtype;
  const int64_t vbytes = c10::elementSize(vdtype);
  const int64_t k = cfg_.compressor == "identity" ? d : k_for(d, cfg_.ratio, cfg_.k);
  std::optional<at::Tensor> indices;
  if (cfg_.compressor == "randk") {
    indices = randk_indices(d, k, randk_seed(cfg_.seed, step, bucket.getIndex())).to(buffer.device());
  }
  auto opt = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
  at::Tensor msg = call_compress(buffer, opt(layout->state), opt(layout->aux), cfg_.algorithm, k, cfg_.momentum,
                                 indices, vdtype);
  // ef21 adds the mean of the messages to g; ef and plain return that mean itself.
  at::Tensor target = keeps_estimate(algo_) ? layout->g : at::zeros({d}, buffer.options().dtype(
                                                                            buffer.scalar_type() == at::kDouble
                                                                                ? at::kDouble
                                                                                : at::kFloat));

  auto deliver = [this, buffer, target](Clock::time_point t1) {
    buffer.copy_(target);
    count(0, 0, nullptr, seconds_since(t1));
    return c10::IValue(buffer);
  };

  // Sums are formed in the state dtype: a running sum in a 16-bit wire dtype would round (or
  // overflow) what the ranks sent, and g would drift from the mean of the g_i that EF21 keeps.
  const at::ScalarType sdtype = target.scalar_type();
  const int64_t sbytes = c10::elementSize(sdtype);

  if (indices) {  // Rand-k: the support is shared, so only values travel
    if (vdtype == sdtype || allreduce_bytes(n, k * sbytes) <= allgather_bytes(n, k * vbytes)) {
      at::Tensor sum = msg.to(sdtype);  // summed by an allreduce
      std::vector<at::Tensor> ts{sum};
      auto work = pg_->allreduce(ts);
      finish(allreduce_bytes(n, k * sbytes), "sparse", t0);
      return work->getFuture()->then(
          [=](Future& f) {
            const auto t1 = Clock::now();
            f.value();
            at::Tensor out = target;
            call_aggregate(out, sum.view({1, k}), k, sdtype, inv_n, indices);
            return deliver(t1);
          },
          c10::TensorType::get());
    }
    // Narrow values are gathered instead and applied in rank order, exactly as received.
    at::Tensor gathered = at::empty({n, k}, msg.options());
    std::vector<std::vector<at::Tensor>> outs{gathered.unbind(0)};
    std::vector<at::Tensor> ins{msg};
    auto work = pg_->allgather(outs, ins);
    finish(allgather_bytes(n, k * vbytes), "sparse", t0);
    return work->getFuture()->then(
        [=](Future& f) {
          const auto t1 = Clock::now();
          f.value();
          at::Tensor out = target;
          call_aggregate(out, gathered, k, vdtype, inv_n, indices);
          return deliver(t1);
        },
        c10::TensorType::get());
  }

  const int64_t m = msg.numel();
  if (n * m < 2 * d * sbytes) {  // sparse allgather moves fewer bytes than a dense allreduce
    at::Tensor gathered = at::empty({n, m}, msg.options());
    std::vector<std::vector<at::Tensor>> outs{gathered.unbind(0)};
    std::vector<at::Tensor> ins{msg};
    auto work = pg_->allgather(outs, ins);
    finish(allgather_bytes(n, m), "sparse", t0);
    return work->getFuture()->then(
        [=](Future& f) {
          const auto t1 = Clock::now();
          f.value();
          at::Tensor out = target;
          call_aggregate(out, gathered, k, vdtype, inv_n, std::nullopt);
          return deliver(t1);
        },
        c10::TensorType::get());
  }

  // Dense fallback: scatter c and allreduce it; cheaper once k/d exceeds about 1/n.
  at::Tensor dense_c = at::zeros({d}, target.options());
  call_aggregate(dense_c, msg.view({1, m}), k, vdtype, 1.0, std::nullopt);
  std::vector<at::Tensor> ts{dense_c};
  auto work = pg_->allreduce(ts);
  finish(allreduce_bytes(n, d * sbytes), "dense", t0);
  return work->getFuture()->then(
      [=](Future& f) {
        const auto t1 = Clock::now();
        f.value();
        target.add_(dense_c, inv_n);
        return deliver(t1);
      },
      c10::TensorType::get());
}

void EF21Core::count(int64_t sent, int64_t dense, const char* path, double seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  bytes_sent_ += sent;
  dense_bytes_ += dense;
  hook_seconds_ += seconds;
  if (!path) return;
  const std::string p(path);
  if (p == "sparse") ++sparse_buckets_;
  else if (p == "dense") ++dense_buckets_;
  else if (p == "init") ++init_buckets_;
}

std::map<std::string, double> EF21Core::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return {{"steps", double(steps_)},
          {"hook_calls", double(calls_)},
          {"bytes_sent", double(bytes_sent_)},
          {"dense_bytes", double(dense_bytes_)},
          {"compression", bytes_sent_ > 0 ? double(dense_bytes_) / double(bytes_sent_) : 0.0},
          {"sparse_buckets", double(sparse_buckets_)},
          {"dense_buckets", double(dense_buckets_)},
          {"init_buckets", double(init_buckets_)},
          {"hook_seconds", hook_seconds_}};
}

void EF21Core::reset_stats() {
  std::lock_guard<std::mutex> lock(mu_);
  calls_ = bytes_sent_ = dense_bytes_ = sparse_buckets_ = dense_buckets_ = init_buckets_ = 0;
  hook_seconds_ = 0.0;
}

int64_t EF21Core::steps() const {
  std::lock_guard<std::mutex> lock(mu_);
  return steps_;
}

void EF21Core::set_steps(int64_t steps) {
  std::lock_guard<std::mutex> lock(mu_);
  steps_ = steps;
}

std::vector<std::vector<at::Tensor>> EF21Core::bucket_params() const {
  std::vector<std::vector<at::Tensor>> out;
  for (const auto& [index, layout] : layouts_) {
    std::vector<at::Tensor> ps;
    for (auto* impl : layout->params) ps.push_back(states_.at(impl).param);
    out.push_back(std::move(ps));
  }
  return out;
}

std::vector<at::Tensor> EF21Core::params() const {
  std::vector<at::Tensor> out;
  for (auto* impl : order_) out.push_back(states_.at(impl).param);
  return out;
}

EF21Core::ParamState EF21Core::param_state(const at::Tensor& param) const {
  auto it = states_.find(param.unsafeGetTensorImpl());
  TORCH_CHECK(it != states_.end(), "ef21: this parameter has no state (not seen by the hook yet)");
  return it->second;
}

void EF21Core::set_param_state(const at::Tensor& param, const at::Tensor& state, const at::Tensor& aux,
                               const at::Tensor& g, bool initialized) {
  ParamState& ps = state_of(param);
  auto put = [](at::Tensor& slot, const at::Tensor& value) {
    if (!value.defined()) return;
    if (slot.defined() && slot.numel() == value.numel()) slot.copy_(value.reshape({value.numel()}));
    else slot = value.reshape({value.numel()}).clone();
  };
  put(ps.state, state);
  put(ps.aux, aux);
  put(ps.g, g);
  ps.initialized = initialized;
  ps.owner = nullptr;  // rebuild the bucket layout on the next step, copying these values in
}

at::Tensor EF21CommHook::parseHookResult(const c10::IValue& result) {
  if (result.isTensor()) return result.toTensor();
  TORCH_INTERNAL_ASSERT(result.isTensorList(), "ef21: the hook result must be a tensor");
  return result.toTensorVector().at(0);
}

}  // namespace ef21

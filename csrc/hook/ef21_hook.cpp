#include "ef21_hook.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <sstream>

#include "randk.h"

namespace ef21 {
namespace {

using Future = c10::ivalue::Future;
using Clock = std::chrono::steady_clock;
using OptTensor = std::optional<at::Tensor>;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Whether every element of t is finite, as one bool on t's device (no host synchronisation): min
// and max propagate NaN and reach +-inf, so one reduction decides where isfinite(t).all() makes
// four passes and two temporaries (13-16 ms against 1.0 ms on 4.35M floats: benchmarks/compress_cpu.py).
at::Tensor all_finite(const at::Tensor& t) {
  const auto [lo, hi] = at::aminmax(t);
  return at::isfinite(lo).logical_and_(at::isfinite(hi));
}

// The hook reaches the kernels through the dispatcher, so one hook serves every device.
at::Tensor call_compress(const at::Tensor& grad, const OptTensor& state, const OptTensor& aux,
                         const std::string& algorithm, int64_t k, double momentum, const OptTensor& indices,
                         at::ScalarType vdtype, bool update_state) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ef21::compress_", "")
                       .typed<at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&, c10::string_view,
                                         int64_t, double, const OptTensor&, at::ScalarType, bool)>();
  return op.call(grad, state, aux, algorithm, k, momentum, indices, vdtype, update_state);
}

void call_commit(const at::Tensor& grad, const OptTensor& state, const OptTensor& aux, const at::Tensor& message,
                 const std::string& algorithm, int64_t k, double momentum, const OptTensor& indices,
                 at::ScalarType vdtype, const OptTensor& ok) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ef21::commit_", "")
                       .typed<void(const at::Tensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
                                   c10::string_view, int64_t, double, const OptTensor&, at::ScalarType,
                                   const OptTensor&)>();
  op.call(grad, state, aux, message, algorithm, k, momentum, indices, vdtype, ok);
}

void call_aggregate(at::Tensor out, const at::Tensor& messages, int64_t k, at::ScalarType vdtype, double scale,
                    const OptTensor& indices, const OptTensor& ok) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ef21::aggregate_", "")
                       .typed<at::Tensor&(at::Tensor&, const at::Tensor&, int64_t, at::ScalarType, double,
                                          const OptTensor&, const OptTensor&)>();
  op.call(out, messages, k, vdtype, scale, indices, ok);
}

void call_all_finite(at::Tensor ok, const at::Tensor& messages, int64_t k, at::ScalarType vdtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ef21::all_finite_", "")
                       .typed<at::Tensor&(at::Tensor&, const at::Tensor&, int64_t, at::ScalarType)>();
  op.call(ok, messages, k, vdtype);
}

void call_rescale(at::TensorList tensors, const at::Tensor& scale, const at::Tensor& seen) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ef21::rescale_", "")
                       .typed<void(at::TensorList, const at::Tensor&, const at::Tensor&)>();
  op.call(tensors, scale, seen);
}

// A future of `t` for `t`'s device: on CUDA, waiting on it orders the waiter after `t`'s producers.
c10::intrusive_ptr<Future> future_for(const at::Tensor& t) {
  std::vector<c10::Device> devices;
  if (!t.device().is_cpu()) devices.push_back(t.device());
  return c10::make_intrusive<Future>(c10::TensorType::get(), devices);
}

c10::intrusive_ptr<Future> completed(const at::Tensor& t) {
  auto fut = future_for(t);
  fut->markCompleted(c10::IValue(t));
  return fut;
}

OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

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

void EF21Core::set_loss_scale(const at::Tensor& scale) {
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == 1,
              "ef21: the loss scale must be one float32 (a GradScaler's scale), got ", scale.scalar_type(), " with ",
              scale.numel(), " elements");
  loss_scale_ = scale;
}

// Brings a unit's state to the current loss scale (lazily, when the unit is next used): on the
// device, with no host synchronisation, and without touching the data when the scale is unchanged.
void EF21Core::follow_loss_scale(Unit& unit) {
  std::vector<at::Tensor> ts;
  for (const at::Tensor* t : {&unit.state, &unit.aux, &unit.g})
    if (t->defined()) ts.push_back(*t);
  if (ts.empty()) return;
  TORCH_CHECK(loss_scale_.device() == ts[0].device(), "ef21: the GradScaler's scale is on ", loss_scale_.device(),
              ", the gradients on ", ts[0].device(), "; use one GradScaler per device");
  if (!unit.seen.defined()) unit.seen = at::ones({}, loss_scale_.options());  // unscaled so far
  call_rescale(ts, loss_scale_, unit.seen);
}

// A unit over `params` in this order, holding their state: what they had so far (in whichever
// unit, brought to the current loss scale) is copied in, and the units they leave are retired.
std::shared_ptr<EF21Core::Unit> EF21Core::make_unit(const std::vector<at::Tensor>& params, int64_t index,
                                                    at::ScalarType dtype, at::Device device) {
  auto unit = std::make_shared<Unit>();
  unit->index = index;
  for (const auto& p : params) {
    unit->params.push_back(p.unsafeGetTensorImpl());
    unit->offsets.push_back(unit->numel);
    unit->lengths.push_back(p.numel());
    unit->numel += p.numel();
  }
  const auto opts = at::TensorOptions().dtype(dtype).device(device);
  if (algo_ != Algorithm::PLAIN && algo_ != Algorithm::DENSE) unit->state = at::zeros({unit->numel}, opts);
  if (algo_ == Algorithm::EF21_SGDM) unit->aux = at::zeros({unit->numel}, opts);
  if (keeps_estimate(algo_)) unit->g = at::zeros({unit->numel}, opts);

  if (loss_scale_.defined()) {
    for (const auto& p : params) {
      ParamState& ps = state_of(p);
      if (ps.unit) follow_loss_scale(*ps.unit);
    }
    unit->seen = loss_scale_.clone();
  }
  for (size_t j = 0; j < params.size(); ++j) {
    ParamState& ps = state_of(params[j]);
    const int64_t off = unit->offsets[j], len = unit->lengths[j];
    const bool unscaled = !ps.unit && loss_scale_.defined();  // set by set_param_state, in gradient units
    auto move = [&](at::Tensor& slot, const at::Tensor& flat) {
      if (!flat.defined()) return;
      at::Tensor view = flat.narrow(0, off, len);
      if (slot.defined() && slot.numel() == len) {
        view.copy_(slot.reshape({len}));
        if (unscaled) view.mul_(loss_scale_);
      }
      slot = view;
    };
    move(ps.state, unit->state);
    move(ps.aux, unit->aux);
    move(ps.g, unit->g);
    if (ps.unit) ps.unit->retired = true;
    ps.unit = unit;
  }
  return unit;
}

// How a bucket is compressed. A bucket made only of whole units known from before (restored from
// a checkpoint, while DDP runs its first iteration with one big bucket) compresses each unit on its
// own, so a resumed run selects exactly what the uninterrupted one did. Anything else becomes a
// new unit: DDP's buckets as they are now, the state moving per parameter.
std::shared_ptr<EF21Core::Plan> EF21Core::plan_for(c10d::GradBucket& bucket) {
  const at::Tensor& buffer = bucket.getBuffer();
  const auto params = bucket.getParameters();
  const auto grads = bucket.getGradients();
  std::vector<int64_t> offsets, lengths;
  for (const auto& gr : grads) {
    offsets.push_back(gr.storage_offset() - buffer.storage_offset());
    lengths.push_back(gr.numel());
  }
  auto& cached = plans_[bucket.getIndex()];
  if (cached && cached->numel == buffer.numel() && cached->offsets == offsets && cached->lengths == lengths &&
      cached->params.size() == params.size()) {
    bool same = true;
    for (size_t j = 0; j < params.size() && same; ++j) {
      same = cached->params[j] == params[j].unsafeGetTensorImpl() &&
             state_of(params[j]).unit.get() == cached->units[j] && !cached->units[j]->retired;
    }
    if (same) return cached;
  }

  // DDP's buckets changed (or this is the first step): check what they hold.
  int64_t covered = 0;
  for (size_t j = 0; j < params.size(); ++j) {
    TORCH_CHECK(!params[j].is_complex(), "ef21: a parameter of shape ", params[j].sizes(), " is complex (",
                params[j].scalar_type(), "); ef21 compresses real gradients: keep it as a real tensor with a "
                "last dimension of 2 and view it with torch.view_as_complex in forward");
    TORCH_CHECK(lengths[j] == params[j].numel(), "ef21: a gradient in bucket ", bucket.getIndex(), " has ",
                lengths[j], " elements, its parameter ", params[j].numel());
    covered += lengths[j];
  }
  TORCH_CHECK(covered == buffer.numel(), "ef21: the parameters of bucket ", bucket.getIndex(), " cover ", covered,
              " of its ", buffer.numel(), " elements");

  auto plan = std::make_shared<Plan>();
  plan->numel = buffer.numel();
  plan->offsets = offsets;
  plan->lengths = lengths;
  std::vector<Unit*> held;
  bool known = true;
  size_t members = 0;
  for (const auto& p : params) {
    plan->params.push_back(p.unsafeGetTensorImpl());
    Unit* u = state_of(p).unit.get();
    if (!u || u->retired) known = false;
    else if (std::find(held.begin(), held.end(), u) == held.end()) {
      held.push_back(u);
      members += u->params.size();
    }
  }
  known = known && members == params.size();  // every unit lies wholly in this bucket
  if (known && (held.size() >= 2 || held[0]->params == plan->params)) {
    std::unordered_map<c10::TensorImpl*, int64_t> offset_of;
    for (size_t j = 0; j < params.size(); ++j) offset_of[plan->params[j]] = offsets[j];
    for (Unit* u : held) {
      Part part{states_.at(u->params[0]).unit, {}, -1};
      for (auto* impl : u->params) part.bucket_offsets.push_back(offset_of.at(impl));
      part.base = part.bucket_offsets[0];
      for (size_t m = 0; m < u->params.size(); ++m)
        if (part.bucket_offsets[m] != part.base + u->offsets[m]) part.base = -1;
      plan->parts.push_back(std::move(part));
    }
  } else {
    const at::ScalarType sdt = buffer.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    auto unit = make_unit(params, static_cast<int64_t>(bucket.getIndex()), sdt, buffer.device());
    Part part{unit, offsets, 0};
    for (size_t m = 0; m < params.size(); ++m)
      if (offsets[m] != unit->offsets[m]) part.base = -1;
    plan->parts.push_back(std::move(part));
  }
  for (const auto& p : params) plan->units.push_back(state_of(p).unit.get());
  cached = plan;
  return plan;
}

at::Tensor EF21Core::gather(const Part& part, const at::Tensor& flat) {
  const Unit& u = *part.unit;
  if (part.base >= 0) return flat.narrow(0, part.base, u.numel);
  at::Tensor out = at::empty({u.numel}, flat.options());
  for (size_t j = 0; j < u.params.size(); ++j)
    out.narrow(0, u.offsets[j], u.lengths[j]).copy_(flat.narrow(0, part.bucket_offsets[j], u.lengths[j]));
  return out;
}

void EF21Core::scatter(const Part& part, const at::Tensor& unit_flat, at::Tensor& out, const at::Tensor& factor) {
  const Unit& u = *part.unit;
  if (part.base >= 0) {
    at::Tensor view = out.narrow(0, part.base, u.numel);
    at::mul_out(view, unit_flat, factor);
    return;
  }
  for (size_t j = 0; j < u.params.size(); ++j) {
    at::Tensor view = out.narrow(0, part.bucket_offsets[j], u.lengths[j]);
    at::mul_out(view, unit_flat.narrow(0, u.offsets[j], u.lengths[j]), factor);
  }
}

struct EF21Core::StepBarrier {
  struct Entry {
    c10::intrusive_ptr<Future> checked, result;
    Finish finish;
    at::Tensor buffer;
  };
  std::mutex mu;
  std::vector<Entry> entries;
  size_t done = 0;
  bool closed = false;  // the step's last bucket has been enqueued
};

c10::intrusive_ptr<Future> EF21Core::enqueue(const std::shared_ptr<StepBarrier>& barrier,
                                             const c10::intrusive_ptr<Future>& checked, Finish finish,
                                             const at::Tensor& buffer, bool last) {
  auto result = future_for(buffer);
  {
    std::lock_guard<std::mutex> lock(barrier->mu);
    barrier->entries.push_back({checked, result, std::move(finish), buffer});
    barrier->closed = barrier->closed || last;
  }
  checked->addCallback([barrier](Future&) {
    {
      std::lock_guard<std::mutex> lock(barrier->mu);
      if (++barrier->done != barrier->entries.size() || !barrier->closed) return;
    }
    finish_step(barrier);
  });
  return result;
}

// Runs on whichever thread saw the step's last collective complete: every `checked` is complete.
void EF21Core::finish_step(const std::shared_ptr<StepBarrier>& barrier) {
  auto& entries = barrier->entries;
  for (auto& e : entries) {
    if (!e.checked->hasError()) continue;
    for (auto& other : entries) other.result->setError(e.checked->exception_ptr());
    return;
  }
  try {
    at::Tensor ok;
    for (auto& e : entries) {
      e.checked->wait();  // on CUDA: the current stream waits for the bucket's collective and check
      const at::Tensor mine = e.checked->value().toTensor();
      ok = ok.defined() ? ok.logical_and(mine) : mine.clone();
    }
    for (auto& e : entries) e.finish(ok);
    for (auto& e : entries) e.result->markCompleted(c10::IValue(e.buffer));
  } catch (...) {
    for (auto& e : entries)
      if (!e.result->completed()) e.result->setError(std::current_exception());
  }
}

c10::intrusive_ptr<Future> EF21Core::run(c10d::GradBucket& bucket) {
  at::Tensor buffer = bucket.getBuffer();
  TORCH_CHECK(!buffer.is_sparse(), "ef21: bucket ", bucket.getIndex(), " holds sparse gradients (from a module "
              "such as nn.Embedding(sparse=True)); ef21 compresses dense gradients: build it with sparse=False");
  TORCH_CHECK(buffer.is_contiguous() && buffer.dim() == 1, "ef21: the bucket buffer must be flat and contiguous");
  TORCH_CHECK(at::isFloatingType(buffer.scalar_type()), "ef21: gradients must be floating point, got ",
              buffer.scalar_type());
  uint64_t step;
  bool first;
  {
    std::lock_guard<std::mutex> lock(mu_);
    step = static_cast<uint64_t>(steps_);
    first = !in_step_;
    in_step_ = !bucket.isLast();
    if (bucket.isLast()) ++steps_;
    ++calls_;
  }
  if (first) barrier_ = std::make_shared<StepBarrier>();
  auto barrier = barrier_;
  try {
    if (first && check_every_ > 0 && step > 0 && step % check_every_ == 0 && keeps_estimate(algo_))
      check_replicas(buffer.device());
    return run_bucket(bucket, step, barrier);
  } catch (...) {
    // The step cannot complete: fail what DDP already holds of it, and start afresh next time.
    in_step_ = false;
    std::lock_guard<std::mutex> lock(barrier->mu);
    for (auto& e : barrier->entries)
      if (!e.result->completed()) e.result->setError(std::current_exception());
    throw;
  }
}

c10::intrusive_ptr<Future> EF21Core::run_bucket(c10d::GradBucket& bucket, uint64_t step,
                                                const std::shared_ptr<StepBarrier>& barrier) {
  const auto t0 = Clock::now();
  at::Tensor buffer = bucket.getBuffer();
  const bool last = bucket.isLast();
  const int64_t n = world_, d = buffer.numel();
  const int64_t dense_bytes = allreduce_bytes(n, d * static_cast<int64_t>(buffer.element_size()));
  const double inv_n = 1.0 / static_cast<double>(n);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  auto count_sent = [this, dense_bytes](int64_t sent, const char* path, Clock::time_point start) {
    count(sent, dense_bytes, path, seconds_since(start));
  };

  if (algo_ == Algorithm::DENSE) {  // no state: a rank's overflow makes the mean non-finite everywhere
    std::vector<at::Tensor> ts{buffer};
    auto work = pg_->allreduce(ts);
    count_sent(allreduce_bytes(n, d * buffer.element_size()), "dense", t0);
    return work->getFuture()->then(
        [this, buffer, inv_n](Future& f) {
          const auto t1 = Clock::now();
          f.value();
          buffer.mul_(inv_n);
          count(0, 0, nullptr, seconds_since(t1));
          return c10::IValue(buffer);
        },
        c10::TensorType::get());
  }

  auto plan = plan_for(bucket);
  if (loss_scale_.defined())
    for (const auto& part : plan->parts) follow_loss_scale(*part.unit);
  std::vector<ParamState*> members;
  bool initialized = true;
  for (auto* impl : plan->params) {
    members.push_back(&states_.at(impl));
    initialized = initialized && members.back()->initialized;
  }
  auto mark_initialized = [members]() {
    for (auto* ps : members) ps->initialized = true;
  };
  const at::Tensor ok = at::ones({}, buffer.options().dtype(at::kBool));
  auto nan_unless = [nan](const at::Tensor& ok_step) { return at::where(ok_step, 1.0, nan); };

  const at::ScalarType sdtype = buffer.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t sbytes = c10::elementSize(sdtype);
  bool init_step = false;
  if (!keeps_estimate(algo_)) mark_initialized();  // nothing to initialise: e starts at zero
  if (keeps_estimate(algo_) && !initialized) {
    // Initialisation steps read the step's verdict on the host, to know whether they happened.
    if (cfg_.init == "zero") {  // g_i = g = 0 (and v = 0): this step applies nothing
      count_sent(0, "init", t0);
      return enqueue(barrier, completed(ok), [plan, buffer, mark_initialized, nan_unless](const at::Tensor& ok_step) {
        if (ok_step.item<bool>()) {
          for (const auto& part : plan->parts) {
            part.unit->state.zero_();
            part.unit->g.zero_();
            if (part.unit->aux.defined()) part.unit->aux.zero_();
          }
          mark_initialized();
        }
        buffer.zero_().mul_(nan_unless(ok_step));
      }, buffer, last);
    }
    if (cfg_.init == "full") {  // one dense step: g_i = grad_i (v_i = grad_i), g = mean_i grad_i
      at::Tensor sum = buffer.to(sdtype, /*non_blocking=*/false, /*copy=*/true);
      std::vector<at::Tensor> ts{sum};
      auto work = pg_->allreduce(ts);
      count_sent(allreduce_bytes(n, d * sbytes), "init", t0);
      auto checked = work->getFuture()->then(
          [sum, inv_n](Future& f) {
            f.value();
            sum.mul_(inv_n);  // non-finite on every rank when some rank's gradient was
            return c10::IValue(all_finite(sum));
          },
          c10::TensorType::get());
      auto init = [this, plan, sum, buffer, mark_initialized, nan_unless](const at::Tensor& ok_step) {
        const auto t1 = Clock::now();
        if (ok_step.item<bool>()) {
          for (const auto& part : plan->parts) {
            Unit& u = *part.unit;
            u.state.copy_(gather(part, buffer));
            if (u.aux.defined()) u.aux.copy_(gather(part, buffer));
            u.g.copy_(gather(part, sum));
          }
          mark_initialized();
        }
        at::Tensor out = buffer;
        at::mul_out(out, sum, nan_unless(ok_step));
        count(0, 0, nullptr, seconds_since(t1));
      };
      return enqueue(barrier, checked, init, buffer, last);
    }
    // "compressed": g_i = g = 0 (v_i = grad_i), then an ordinary step gives g_i = C(grad_i).
    for (const auto& part : plan->parts) {
      part.unit->state.zero_();
      part.unit->g.zero_();
      if (part.unit->aux.defined()) part.unit->aux.copy_(gather(part, buffer));
    }
    init_step = true;
  }

  // One message per unit (usually one), sent together in one collective. compress_ only reads the
  // state; commit_ updates it once the step's messages are all known to be finite.
  struct Msg {
    Part part;
    at::Tensor grad, msg, target;
    OptTensor indices;
    int64_t k = 0, offset = 0;  // offset in the wire buffer
  };
  const at::ScalarType vdtype = cfg_.value_dtype;
  const int64_t vbytes = c10::elementSize(vdtype);
  const bool randk = cfg_.compressor == "randk";
  std::vector<Msg> msgs;
  std::vector<at::Tensor> wires;
  int64_t total = 0;
  for (const auto& part : plan->parts) {
    Unit& u = *part.unit;
    Msg m{part, gather(part, buffer)};
    m.k = cfg_.compressor == "identity" ? u.numel : k_for(u.numel, cfg_.ratio, cfg_.k);
    if (randk) m.indices = randk_indices(u.numel, m.k, randk_seed(cfg_.seed, step, u.index)).to(buffer.device());
    m.msg = call_compress(m.grad, opt(u.state), opt(u.aux), cfg_.algorithm, m.k, cfg_.momentum, m.indices, vdtype,
                          /*update_state=*/false);
    // Top-k always sends a non-finite value; Rand-k may not hold one, so it sends NaN to say so.
    if (randk) m.msg.masked_fill_(all_finite(m.grad).logical_not(), nan);
    // ef21 adds the mean of the messages to g; ef and plain return that mean itself.
    m.target = keeps_estimate(algo_) ? u.g : at::zeros({u.numel}, buffer.options().dtype(sdtype));
    m.offset = total;
    total += m.msg.numel();
    wires.push_back(m.msg);
    msgs.push_back(std::move(m));
  }
  const at::Tensor wire = wires.size() == 1 ? wires[0] : at::cat(wires);

  // The end of a bucket: add what arrived with apply(target of each unit), commit each unit's
  // state, and hand DDP g (or the mean of c), NaN everywhere when the step is skipped.
  using Apply = std::function<void(const Msg&, size_t, const at::Tensor& ok_step)>;
  auto end = [this, msgs, buffer, init_step, mark_initialized, nan_unless](const Apply& apply) -> Finish {
    return [this, msgs, buffer, init_step, mark_initialized, nan_unless, apply](const at::Tensor& ok_step) {
      const auto t1 = Clock::now();
      const auto& c = cfg_;
      for (size_t j = 0; j < msgs.size(); ++j) {
        const Msg& m = msgs[j];
        apply(m, j, ok_step);
        Unit& u = *m.part.unit;
        call_commit(m.grad, opt(u.state), opt(u.aux), m.msg, c.algorithm, m.k, c.momentum, m.indices, c.value_dtype,
                    ok_step);
      }
      if (init_step && ok_step.item<bool>()) mark_initialized();
      const at::Tensor factor = nan_unless(ok_step);
      at::Tensor out = buffer;
      for (const auto& m : msgs) scatter(m.part, m.target, out, factor);
      count(0, 0, nullptr, seconds_since(t1));
    };
  };

  if (randk) {  // the support is shared, so only values travel
    if (vdtype == sdtype || allreduce_bytes(n, total * sbytes) <= allgather_bytes(n, total * vbytes)) {
      at::Tensor sum = wire.to(sdtype, /*non_blocking=*/false, /*copy=*/true);  // summed by an allreduce
      std::vector<at::Tensor> ts{sum};
      auto work = pg_->allreduce(ts);
      count_sent(allreduce_bytes(n, total * sbytes), "sparse", t0);
      auto checked = work->getFuture()->then(
          [sum](Future& f) {
            f.value();
            return c10::IValue(all_finite(sum));
          },
          c10::TensorType::get());
      return enqueue(barrier, checked, end([sum, sdtype, inv_n](const Msg& m, size_t, const at::Tensor& ok_step) {
        call_aggregate(m.target, sum.narrow(0, m.offset, m.k).view({1, m.k}), m.k, sdtype, inv_n, m.indices, ok_step);
      }), buffer, last);
    }
    // Narrow values are gathered instead and applied in rank order, exactly as received.
    at::Tensor gathered = at::empty({n, total}, wire.options());
    std::vector<std::vector<at::Tensor>> outs{gathered.unbind(0)};
    std::vector<at::Tensor> ins{wire};
    auto work = pg_->allgather(outs, ins);
    count_sent(allgather_bytes(n, total * vbytes), "sparse", t0);
    auto checked = work->getFuture()->then(
        [gathered](Future& f) {
          f.value();
          return c10::IValue(all_finite(gathered));
        },
        c10::TensorType::get());
    const bool single = msgs.size() == 1;
    auto apply = [gathered, single, vdtype, inv_n](const Msg& m, size_t, const at::Tensor& ok_step) {
      at::Tensor rows = single ? gathered : gathered.narrow(1, m.offset, m.k).contiguous();
      call_aggregate(m.target, rows, m.k, vdtype, inv_n, m.indices, ok_step);
    };
    return enqueue(barrier, checked, end(apply), buffer, last);
  }

  if (n * total < 2 * d * sbytes) {  // sparse allgather moves fewer bytes than a dense allreduce
    at::Tensor gathered = at::empty({n, total}, wire.options());
    std::vector<std::vector<at::Tensor>> outs{gathered.unbind(0)};
    std::vector<at::Tensor> ins{wire};
    auto work = pg_->allgather(outs, ins);
    count_sent(allgather_bytes(n, total), "sparse", t0);
    const bool single = msgs.size() == 1;
    auto rows_of = [gathered, single](const Msg& m) {
      return single ? gathered : gathered.narrow(1, m.offset, m.msg.numel()).contiguous();
    };
    auto checked = work->getFuture()->then(
        [msgs, ok, rows_of, vdtype](Future& f) {
          f.value();
          const at::Tensor mine = ok.clone();
          for (const auto& m : msgs) call_all_finite(mine, rows_of(m), m.k, vdtype);
          return c10::IValue(mine);
        },
        c10::TensorType::get());
    return enqueue(barrier, checked, end([rows_of, vdtype, inv_n](const Msg& m, size_t, const at::Tensor& ok_step) {
      call_aggregate(m.target, rows_of(m), m.k, vdtype, inv_n, std::nullopt, ok_step);
    }), buffer, last);
  }

  // Dense fallback: scatter c and allreduce it; cheaper once k/d exceeds about 1/n.
  at::Tensor dense_c = at::zeros({d}, buffer.options().dtype(sdtype));  // units end to end
  std::vector<int64_t> at_c;
  int64_t c_off = 0;
  for (const auto& m : msgs) {
    call_aggregate(dense_c.narrow(0, c_off, m.part.unit->numel), m.msg.view({1, m.msg.numel()}), m.k, vdtype, 1.0,
                   std::nullopt, std::nullopt);
    at_c.push_back(c_off);
    c_off += m.part.unit->numel;
  }
  std::vector<at::Tensor> ts{dense_c};
  auto work = pg_->allreduce(ts);
  count_sent(allreduce_bytes(n, d * sbytes), "dense", t0);
  auto checked = work->getFuture()->then(
      [dense_c](Future& f) {
        f.value();
        return c10::IValue(all_finite(dense_c));
      },
      c10::TensorType::get());
  return enqueue(barrier, checked, end([dense_c, at_c, inv_n](const Msg& m, size_t j, const at::Tensor& ok_step) {
    at::Tensor c = dense_c.narrow(0, at_c[j], m.part.unit->numel).masked_fill(ok_step.logical_not(), 0.0);
    m.target.add_(c, inv_n);
  }), buffer, last);
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
  for (const auto& [index, plan] : plans_) {
    std::vector<at::Tensor> ps;
    for (auto* impl : plan->params) ps.push_back(states_.at(impl).param);
    out.push_back(std::move(ps));
  }
  return out;
}

std::vector<std::pair<int64_t, std::vector<at::Tensor>>> EF21Core::units() const {
  std::vector<std::pair<int64_t, std::vector<at::Tensor>>> out;
  std::vector<const Unit*> seen;
  for (auto* impl : order_) {
    const Unit* u = states_.at(impl).unit.get();
    if (!u || u->retired || std::find(seen.begin(), seen.end(), u) != seen.end()) continue;
    seen.push_back(u);
    std::vector<at::Tensor> ps;
    for (auto* p : u->params) ps.push_back(states_.at(p).param);
    out.emplace_back(u->index, std::move(ps));
  }
  return out;
}

void EF21Core::set_units(const std::vector<std::pair<int64_t, std::vector<at::Tensor>>>& units) {
  for (auto& [impl, ps] : states_) {
    ps.state = ps.aux = ps.g = at::Tensor();
    ps.unit.reset();
    ps.initialized = false;
  }
  plans_.clear();
  for (const auto& [index, params] : units) {
    TORCH_CHECK(!params.empty(), "ef21: a compression unit needs at least one parameter");
    for (const auto& p : params) {
      TORCH_CHECK(!state_of(p).unit, "ef21: a parameter of shape ", p.sizes(), " is in two compression units");
      TORCH_CHECK(p.device() == params[0].device() && p.scalar_type() == params[0].scalar_type(),
                  "ef21: a compression unit must hold parameters of one dtype and device");
    }
    const at::ScalarType sdt = params[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    auto unit = make_unit(params, index, sdt, params[0].device());
    unit->seen = at::Tensor();  // restored values are set unscaled
  }
}

std::vector<at::Tensor> EF21Core::params() const {
  std::vector<at::Tensor> out;
  for (auto* impl : order_) out.push_back(states_.at(impl).param);
  return out;
}

EF21Core::ParamState EF21Core::param_state(const at::Tensor& param) const {
  auto it = states_.find(param.unsafeGetTensorImpl());
  TORCH_CHECK(it != states_.end(), "ef21: this parameter has no state (not seen by the hook yet)");
  ParamState out = it->second;
  const at::Tensor seen = out.unit ? out.unit->seen : at::Tensor();
  for (at::Tensor* t : {&out.state, &out.aux, &out.g}) {
    if (!t->defined()) continue;
    *t = t->detach().clone();
    if (seen.defined()) t->div_(seen);
  }
  return out;
}

void EF21Core::set_param_state(const at::Tensor& param, const at::Tensor& state, const at::Tensor& aux,
                               const at::Tensor& g, bool initialized) {
  ParamState& ps = state_of(param);
  const at::Tensor seen = ps.unit ? ps.unit->seen : at::Tensor();
  auto put = [&](at::Tensor& slot, const at::Tensor& value, const char* name) {
    if (!value.defined()) return;
    at::Tensor flat = value.reshape({value.numel()});
    if (!slot.defined()) {  // no unit holds it yet: kept until one does
      slot = flat.to(param.device(), param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat,
                     /*non_blocking=*/false, /*copy=*/true);
      return;
    }
    TORCH_CHECK(slot.numel() == flat.numel(), "ef21: ", name, " has ", flat.numel(), " elements, the parameter ",
                slot.numel());
    slot.copy_(flat);
    if (seen.defined()) slot.mul_(seen);
  };
  put(ps.state, state, "state");
  put(ps.aux, aux, "aux");
  put(ps.g, g, "g");
  ps.initialized = initialized;
}

void EF21Core::reinitialize() {
  for (auto& [impl, ps] : states_) {
    for (at::Tensor* t : {&ps.state, &ps.aux, &ps.g})
      if (t->defined()) t->zero_();
    ps.initialized = false;
  }
}

void EF21Core::check_replicas(const at::Device& device) {
  const auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  at::Tensor sum = at::zeros({1}, opts);
  for (auto* impl : order_) {
    const at::Tensor& g = states_.at(impl).g;
    if (!g.defined()) continue;
    // The bit patterns summed as integers: exact and order-free, so equal g gives equal sums on
    // every rank whatever its thread count, and any changed bit changes the sum.
    at::Tensor bits = g.scalar_type() == at::kDouble ? g.view(at::kLong) : g.view(at::kInt).to(at::kLong);
    sum.add_(bits.sum().to(device));
  }
  at::Tensor all = at::empty({world_, 1}, opts);
  std::vector<std::vector<at::Tensor>> outs{all.unbind(0)};
  std::vector<at::Tensor> ins{sum};
  pg_->allgather(outs, ins)->wait();
  const at::Tensor host = all.cpu();
  const int64_t* v = host.const_data_ptr<int64_t>();
  std::vector<int64_t> differ;
  for (int64_t r = 1; r < world_; ++r)
    if (v[r] != v[0]) differ.push_back(r);
  if (differ.empty()) return;
  std::ostringstream msg;
  msg << "ef21: replicas differ before step " << steps() << ": the shared estimate g is not bitwise identical on "
      << "every rank; rank(s) [";
  for (size_t j = 0; j < differ.size(); ++j) msg << (j ? ", " : "") << differ[j];
  msg << "] differ from rank 0 (checksums by rank:";
  for (int64_t r = 0; r < world_; ++r) msg << " " << r << ":" << v[r];
  msg << "). Every rank must load its own checkpoint of the same step, or reinitialize() together.";
  TORCH_CHECK(false, msg.str());
}

at::Tensor EF21CommHook::parseHookResult(const c10::IValue& result) {
  if (result.isTensor()) return result.toTensor();
  TORCH_INTERNAL_ASSERT(result.isTensorList(), "ef21: the hook result must be a tensor");
  return result.toTensorVector().at(0);
}

}  // namespace ef21

"""The training loop: sharded state, one jitted step, EMA, periodic actions, checkpoints.

config -> mesh + shardings -> data iterator (per-host slice, checkpointable) -> global batch
-> train_step(state, batch) (jit, donated state) -> objective.loss -> grads -> optax -> EMA
-> clu metrics -> periodic actions (progress, sample grid, checkpoint).

The state is a plain pytree {step, params, opt_state, ema, rng}; params = {'net': the model's
nnx.Param values as a pure dict, **the objective's extra parameters}. The model is built
abstractly (nnx.eval_shape), its logical axis names turned into shardings, and the real
initialisation jitted with those out_shardings, so full parameters never sit on one device.
The step's randomness is fold_in(rng, step): a resumed run draws exactly what a straight run does.
"""
import dataclasses
import os
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from flax import nnx
from jax.sharding import PartitionSpec as P

from kdiff_jax import checkpoint, config as config_lib, data, evaluate, images, models, objectives
from kdiff_jax import parallel
from kdiff_jax.data import latents


@dataclasses.dataclass
class Setup:
  """Everything built from a config before any step runs."""
  config: Any
  mesh: jax.sharding.Mesh
  graphdef: Any
  objective: objectives.Objective
  optimizer: optax.GradientTransformation
  abstract_state: Any     # ShapeDtypeStructs carrying their shardings
  state_shardings: Any
  num_params: int


def build_model(config):
  """(graphdef, abstract net params as a pure dict, their logical PartitionSpecs)."""
  with nnx.use_eager_sharding(False):
    abstract_model = nnx.eval_shape(lambda: models.build(config, nnx.Rngs(config.seed)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
  return graphdef, nnx.to_pure_dict(abstract_params), logical


def make_apply_fn(config, graphdef):
  """apply_fn(net_params, x_t, t, labels, s=None, full_precision=False) -> network output.

  full_precision=True runs the float32 build of the same network (IMM's target pass).
  """
  full = config.copy_and_resolve_references()
  full.model.compute_dtype = "float32"
  graphdef_f32 = graphdef if config.model.compute_dtype == "float32" else build_model(full)[0]

  def apply_fn(net_params, x_t, t, labels, s=None, full_precision=False):
    return nnx.merge(graphdef_f32 if full_precision else graphdef, net_params)(x_t, t, labels, s)
  return apply_fn


def make_optimizer(opt_config, num_steps: int) -> optax.GradientTransformation:
  """AdamW (Loshchilov & Hutter 2019) with linear warm-up, then constant or cosine decay.

  Weight decay applies to arrays with ndim >= 2 only: never to biases, norms or scalars such
  as k-Diff's w_k.
  """
  lr, warmup = opt_config.learning_rate, opt_config.warmup_steps
  if opt_config.lr_schedule == "constant":
    schedule = optax.warmup_constant_schedule(0.0 if warmup else lr, lr, max(warmup, 1))
  else:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(num_steps, warmup + 1))
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  adamw = optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                      weight_decay=opt_config.weight_decay, mask=decay_mask)
  if opt_config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(opt_config.grad_clip_norm), adamw)
  return adamw


def ema_key(decay: float) -> str:
  return f"{decay:g}"


def setup(config, devices=None) -> Setup:
  """Validate the config, build mesh, model, objective, optimizer and the state's shardings."""
  config_lib.validate(config)
  mesh = parallel.make_mesh(config.mesh, devices)
  parallel.check_batch_divides(config.training.batch_size, mesh)
  graphdef, abstract_net, logical_net = build_model(config)
  objective = objectives.build(config, make_apply_fn(config, graphdef))
  per_device = config.training.batch_size // (mesh.shape["data"] * mesh.shape["fsdp"])
  if per_device % objective.group_size:
    raise ValueError(f"training.batch_size={config.training.batch_size} gives {per_device} "
                     f"examples per device, not a multiple of the objective's group size "
                     f"{objective.group_size}: groups must stay whole on one device")
  optimizer = make_optimizer(config.optimizer, config.training.num_steps)

  abstract_params = {"net": abstract_net, **jax.eval_shape(lambda: objective.extra_params)}
  logical_params = {"net": logical_net, **jax.tree.map(lambda _: P(), objective.extra_params)}
  param_shardings = parallel.tree_shardings(abstract_params, logical_params, mesh, config.mesh.rules)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  replicated = parallel.replicated(mesh)
  opt_shardings = optax.tree_map_params(
      optimizer, lambda _, sharding: sharding, abstract_opt, param_shardings,
      transform_non_params=lambda _: replicated)
  state_shardings = {
      "step": replicated,
      "params": param_shardings,
      "opt_state": opt_shardings,
      "ema": {ema_key(d): param_shardings for d in config.training.ema_decays},
      "rng": replicated,
  }
  abstract_state = {
      "step": jax.ShapeDtypeStruct((), jnp.int32),
      "params": abstract_params,
      "opt_state": abstract_opt,
      "ema": {ema_key(d): abstract_params for d in config.training.ema_decays},
      "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
  }
  abstract_state = checkpoint.abstract_with_shardings(abstract_state, state_shardings)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))
  return Setup(config, mesh, graphdef, objective, optimizer, abstract_state, state_shardings,
               num_params)


def init_state(s: Setup):
  """The real initial state, created directly in its shardings."""
  config = s.config

  def init():
    model = models.build(config, nnx.Rngs(config.seed))
    params = {"net": nnx.to_pure_dict(nnx.state(model, nnx.Param)), **s.objective.extra_params}
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": s.optimizer.init(params),
        "ema": {ema_key(d): params for d in config.training.ema_decays},
        "rng": jax.random.key_data(jax.random.key(config.seed + 1)).astype(jnp.uint32),
    }

  with nnx.use_eager_sharding(False), jax.set_mesh(s.mesh):
    return jax.jit(init, out_shardings=s.state_shardings)()


def make_train_step(s: Setup):
  """train_step(state, batch) -> (state, metrics), jitted with shardings and a donated state."""
  decays = tuple(s.config.training.ema_decays)

  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    grad_fn = jax.value_and_grad(s.objective.loss, has_aux=True)
    (loss, metrics), grads = grad_fn(state["params"], batch, rng)
    updates, opt_state = s.optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = {ema_key(d): jax.tree.map(lambda e, p, d=d: d * e + (1.0 - d) * p,
                                    state["ema"][ema_key(d)], params) for d in decays}
    metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
    new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state, ema=ema)
    return new_state, metrics

  batch_shardings = {"image": parallel.batch_sharding(s.mesh, s.config.mesh.rules),
                     "label": parallel.batch_sharding(s.mesh, s.config.mesh.rules)}
  return jax.jit(train_step, in_shardings=(s.state_shardings, batch_shardings),
                 out_shardings=(s.state_shardings, parallel.replicated(s.mesh)),
                 donate_argnums=(0,))


def make_sample_fn(s: Setup, labels):
  """sample(params, key) -> [len(labels), H, W, C] images of the given classes, replicated on every host."""
  config = s.config
  labels = jnp.asarray(labels, jnp.int32)
  shape = (labels.shape[0], config.data.image_size, config.data.image_size, config.data.channels)

  def sample(params, key):
    key_noise, key_sampler = jax.random.split(key)
    noise = config.objective.noise_std * jax.random.normal(key_noise, shape, jnp.float32)
    return s.objective.sample(params, noise, labels, key_sampler)

  return jax.jit(sample, out_shardings=parallel.replicated(s.mesh))


def cycling_labels(num_samples: int, classes):
  """Labels for num_samples samples cycling through `classes`."""
  classes = np.asarray(classes, np.int32)
  return classes[np.arange(num_samples) % len(classes)]


def sampling_params(state, config):
  """The EMA weights of the first decay when sampling.use_ema, else the raw weights."""
  if config.sampling.use_ema and config.training.ema_decays:
    return state["ema"][ema_key(config.training.ema_decays[0])]
  return state["params"]


class NonFiniteLossError(FloatingPointError):
  pass


class PreemptionWatch:
  """watch(step) is True at the step where every process should checkpoint and stop.

  Several processes: JAX's preemption sync (SIGTERM to any host; all agree on the next step,
  multihost_utils.reached_preemption_sync_point must be called every step). One process: a
  SIGTERM handler that the next step sees.
  """

  def __init__(self):
    self.multihost = jax.process_count() > 1
    self.signalled = False
    if not self.multihost and threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: checkpointing after this step, then exiting")
    self.signalled = True

  def __call__(self, step: int) -> bool:
    if self.multihost:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signalled

  def close(self):
    if not self.multihost and hasattr(self, "previous"):
      signal.signal(signal.SIGTERM, self.previous)


def train_and_evaluate(config, workdir: str):
  """Train (resuming from the latest checkpoint in workdir) and return the final state."""
  s = setup(config)
  training = config.training
  parallel.log_once("mesh %s on %d devices, %d processes; %d parameters; global batch %d",
                    parallel.describe(s.mesh), s.mesh.size, jax.process_count(), s.num_params,
                    training.batch_size)

  mngr = checkpoint.manager(workdir, config.checkpoint)
  if mngr.latest_step() is not None:
    state, position = checkpoint.restore(mngr, s.abstract_state)
    parallel.log_once("resumed from step %d", int(state["step"]))
  else:
    state, position = init_state(s), 0
  start_step = int(state["step"])

  iterator = data.build_iterator(
      config.data, global_batch_size=training.batch_size,
      sharding=parallel.batch_sharding(s.mesh, config.mesh.rules), seed=config.seed,
      start_batch=position)
  train_step = make_train_step(s)
  sample_fn = make_sample_fn(
      s, cycling_labels(config.sampling.grid_size**2, range(config.data.num_classes)))

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(config_lib.flatten(config))
  report = periodic_actions.ReportProgress(num_train_steps=training.num_steps, writer=writer)

  def write_samples(step):
    key = jax.random.fold_in(jax.random.key(config.sampling.seed), step)
    grid = latents.decode_for_display(config, sample_fn(sampling_params(state, config), key))
    if jax.process_index() == 0:
      png = images.save_grid(grid, os.path.join(workdir, "samples", f"step_{step:08d}.png"))
      writer.write_images(step, {"samples": png[None]})

  fid = evaluate.FidAction(s, config) if config.eval.fid_every else None
  preempted = PreemptionWatch()
  pending, history = None, []
  try:
    with metric_writers.ensure_flushes(writer):
      for step in range(start_step + 1, training.num_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, metrics = train_step(state, next(iterator))
        # Check the previous step's loss while this one runs: no host sync per step.
        if pending is not None:
          history.append(_check_finite(*pending))
        pending = (step, metrics)
        report(step)
        stop = preempted(step)
        last = step == training.num_steps
        if step % training.log_every == 0 or last:
          history.append(_check_finite(*pending))
          pending = None
          _write_metrics(writer, step, history, training.per_step_metrics)
          history = []
        if training.sample_every and step % training.sample_every == 0 or last:
          write_samples(step)
        if fid is not None and (step % config.eval.fid_every == 0 or last):
          writer.write_scalars(step, fid(sampling_params(state, config)))
        if step % training.checkpoint_every == 0 or last or stop:
          if pending is not None:
            history.append(_check_finite(*pending))
            pending = None
          checkpoint.save(mngr, step, state, iterator.position, config)
        if stop:
          parallel.log_once("preempted: saved step %d, exiting", step)
          break
  finally:
    preempted.close()
    mngr.wait_until_finished()
    mngr.close()
  return state


def _check_finite(step: int, metrics) -> tuple:
  """(step, {name: float}) of one step's metrics; raises on a non-finite loss."""
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not np.isfinite(values["loss"]):
    raise NonFiniteLossError(f"non-finite loss {values['loss']} at step {step}")
  return step, values


def _write_metrics(writer, step: int, history, per_step_names) -> None:
  """The mean over `history` ((step, values) since the last write) at `step`; the metrics named
  in training.per_step_metrics (k-Diff's k) at each of their own steps instead."""
  names = history[-1][1]
  per_step = [name for name in names if name in per_step_names]
  if per_step:
    for own_step, values in history:
      writer.write_scalars(own_step, {name: values[name] for name in per_step})
  writer.write_scalars(step, {name: float(np.mean([values[name] for _, values in history]))
                              for name in names if name not in per_step})

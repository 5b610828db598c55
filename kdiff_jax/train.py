"""Training: the optimizer, one jitted step, and the loop over periodic actions.

  config -> config.validate -> mesh -> state.Weights (model, objective, parameter shardings)
  -> optimizer -> the train state restored or initialised in its shardings -> data iterator
  -> train_step(state, batch) (jit, donated state) -> metrics kept on the device
  -> the actions due at this step: metrics (fetched only here), checkpoint, sample grid, FID

Before the first step: the config is validated, a resumed run's config is compared with its
checkpoint's (`config.check_resume`), a damaged newest checkpoint is set aside for an older one
(`checkpoint.restore`), and the sample grid and FID are traced with abstract shapes, so nothing
that would fail at step N fails after N steps of work. A non-finite (or, with
training.spike_factor, spiking) loss or gradient stops the run naming the step and what went
non-finite, or with training.on_nonfinite='rollback_skip' restores the newest checkpoint and
skips every batch since it.

The train state is a plain pytree {step, params, opt_state, ema, rng}; params = {'net': the
model's parameters as a pure dict, **the objective's extra parameters}. An objective with a
`teacher_decay` (TVM) adds 'teacher': an EMA of params with that decay (sharded like them,
updated every step after the optimizer, checkpointed; never an evaluation EMA), handed to its
loss as `teacher=`. The step's randomness is
fold_in(rng, step): a resumed run draws exactly what a straight run does. Nothing here knows a
particular objective, the VAE or Inception: sample grids and FID are actions of actions.py.
"""
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kdiff_jax import actions, checkpoint, config as config_lib, console, data, events, parallel
from kdiff_jax import sampling, schema, state as state_lib


@dataclasses.dataclass
class Setup:
  """Everything built from a config before any step runs."""
  config: Any
  mesh: jax.sharding.Mesh
  weights: state_lib.Weights
  optimizer: optax.GradientTransformation
  abstract_state: Any     # ShapeDtypeStructs carrying their shardings
  state_shardings: Any

  @property
  def objective(self):
    return self.weights.objective

  @property
  def model(self) -> state_lib.Model:
    return self.weights.model


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


def setup(config, devices=None) -> Setup:
  """Validate the config, build mesh, model, objective, optimizer and the state's shardings."""
  config_lib.validate(config)
  mesh = parallel.make_mesh(config.mesh, devices)
  weights = state_lib.Weights(config, mesh)
  parallel.check_batch(config.training.batch_size,
                       parallel.batch_sharding(mesh, config.mesh.rules),
                       field="training.batch_size", group_size=weights.objective.group_size)
  optimizer = make_optimizer(config.optimizer, config.training.num_steps)
  abstract_opt = jax.eval_shape(optimizer.init, weights.abstract)
  replicated = parallel.replicated(mesh)
  opt_shardings = optax.tree_map_params(
      optimizer, lambda _, sharding: sharding, abstract_opt, weights.shardings,
      transform_non_params=lambda _: replicated)
  emas = [checkpoint.ema_key(d) for d in config.training.ema_decays]
  state_shardings = {"step": replicated, "params": weights.shardings, "opt_state": opt_shardings,
                     "ema": {key: weights.shardings for key in emas}, "rng": replicated}
  abstract_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": weights.abstract,
                    "opt_state": abstract_opt, "ema": {key: weights.abstract for key in emas},
                    "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  if weights.objective.teacher_decay is not None:   # the objective's EMA teacher (TVM)
    state_shardings["teacher"] = weights.shardings
    abstract_state["teacher"] = weights.abstract
  abstract_state = checkpoint.abstract_with_shardings(abstract_state, state_shardings)
  s = Setup(config, mesh, weights, optimizer, abstract_state, state_shardings)
  _check_per_step_metrics(s)
  return s


def _check_per_step_metrics(s: Setup) -> None:
  """training.per_step_metrics name metrics the step returns (traced with abstract shapes)."""
  wanted = set(s.config.training.per_step_metrics)
  if not wanted:
    return
  batch = s.config.training.batch_size
  abstract_batch = {
      "image": jax.ShapeDtypeStruct((batch,) + data.element_shape(s.config.data), jnp.float32),
      "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  _, metrics = jax.eval_shape(s.objective.loss, s.weights.abstract, abstract_batch,
                              jax.random.key(0))
  known = sorted(set(metrics) | {"loss", "grad_norm"})
  if wanted - set(known):
    raise ValueError(f"training.per_step_metrics={tuple(s.config.training.per_step_metrics)}: "
                     f"objective.name={s.config.objective.name!r} logs only {known}")


def init_state(s: Setup):
  """The real initial state, created directly in its shardings."""
  config = s.config

  def init():
    params = {"net": state_lib.init_net(config), **s.objective.extra_params}
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": s.optimizer.init(params),
        "ema": {checkpoint.ema_key(d): params for d in config.training.ema_decays},
        "rng": jax.random.key_data(jax.random.key(config.seed + 1)).astype(jnp.uint32),
        **({"teacher": params} if s.objective.teacher_decay is not None else {}),
    }

  with nnx.use_eager_sharding(False), jax.set_mesh(s.mesh):
    return jax.jit(init, out_shardings=s.state_shardings)()


def make_train_step(s: Setup):
  """train_step(state, batch) -> (state, metrics), jitted with shardings and a donated state."""
  decays = tuple(s.config.training.ema_decays)

  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    grad_fn = jax.value_and_grad(s.objective.loss, has_aux=True)
    teacher = {"teacher": state["teacher"]} if "teacher" in state else {}
    (loss, metrics), grads = grad_fn(state["params"], batch, rng, **teacher)
    updates, opt_state = s.optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = {checkpoint.ema_key(d): jax.tree.map(lambda e, p, d=d: d * e + (1.0 - d) * p,
                                               state["ema"][checkpoint.ema_key(d)], params)
           for d in decays}
    finite = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    first_nonfinite = jnp.where(jnp.all(finite), -1, jnp.argmin(finite))
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               actions.FIRST_NONFINITE_GRADIENT: first_nonfinite}
    new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state, ema=ema)
    if "teacher" in state:   # teacher <- lerp toward the updated weights, every step
      d = s.objective.teacher_decay
      new_state["teacher"] = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["teacher"],
                                          params)
    return new_state, metrics

  batch_sharding = parallel.batch_sharding(s.mesh, s.config.mesh.rules)
  return jax.jit(train_step, in_shardings=(s.state_shardings, {"image": batch_sharding,
                                                               "label": batch_sharding}),
                 out_shardings=(s.state_shardings, parallel.replicated(s.mesh)),
                 donate_argnums=(0,))


def sampling_params(state, config):
  """The EMA weights of the first decay when sampling.use_ema, else the raw weights."""
  if config.sampling.use_ema and config.training.ema_decays:
    return state["ema"][checkpoint.ema_key(config.training.ema_decays[0])]
  return state["params"]


def _header(config, workdir, s: Setup, start_step: int, source: str) -> None:
  model, objective = config.model, config.objective
  size = (f"{model.size}/{model.patch_size}" if model.name != "mlp"
          else f"{model.mlp_width}x{model.mlp_depth}")
  console.info("kdiff_jax train %s-> %s", f"{source} " if source else "", workdir)
  console.info("  model %s %s, %s parameters; objective %s (%s); data %s %dx%dx%d",
               model.name, size, f"{s.model.num_params:,}", objective.name, objective.schedule,
               config.data.name, config.data.image_size, config.data.image_size,
               config.data.channels)
  console.info("  mesh %s on %d %s device(s), %d process(es); global batch %d",
               parallel.describe(s.mesh), s.mesh.size, jax.devices()[0].platform,
               jax.process_count(), config.training.batch_size)
  console.info("  %s; %d steps to go",
               f"resumed from step {start_step}" if start_step else "starting at step 0",
               config.training.num_steps - start_step)


def _restore_or_init(s: Setup, mngr, workdir: str, allow_config_change=()):
  """(state, data position): the newest checkpoint that restores, checked against the config, or
  the initial state when there is none."""
  if mngr.latest_step() is None:
    return init_state(s), 0
  saved_step = mngr.latest_step()
  changed = config_lib.check_resume(checkpoint.load_config(workdir, saved_step), s.config,
                                    step=saved_step, allowed=allow_config_change)
  if changed:
    console.info("resuming with changed fields: %s", "; ".join(
        f"{path}: {old!r} -> {new!r}" for path, (old, new) in changed.items()))
  return checkpoint.restore(mngr, s.abstract_state)


def _divergence_advice(mngr, config) -> str:
  """Where the last good state is and what to do, for a run stopped by a divergence."""
  newest = mngr.latest_step()
  kept = (f"the newest checkpoint, step {newest}, holds the last good state"
          if newest is not None else "no checkpoint was written yet")
  policy = config.training.on_nonfinite
  advice = ("lower optimizer.learning_rate, set optimizer.grad_clip_norm, compute in float32 "
            "(model.compute_dtype), or set training.on_nonfinite='rollback_skip' to restore it "
            "and skip the batches since" if policy == "stop" else
            f"training.max_rollbacks={config.training.max_rollbacks} rollbacks are used up")
  return f"{kept}. To go on: {advice}."


def train_and_evaluate(config, workdir: str, *, source: str = "", allow_config_change=(),
                       devices=None):
  """Train (resuming from the newest checkpoint in workdir) and return the final state.

  source: where the config came from (the config file), for the console header.
  allow_config_change: fields a resumed run may change although config.check_resume refuses.
  devices: the devices of the mesh (default: all).
  """
  s = setup(config, devices)
  training = config.training
  mngr = checkpoint.manager(workdir, config.checkpoint)
  state, position = _restore_or_init(s, mngr, workdir, allow_config_change)
  start_step = int(state["step"])
  _header(config, workdir, s, start_step, source)

  build_iterator = lambda start: data.build_iterator(
      config.data, global_batch_size=training.batch_size,
      sharding=parallel.batch_sharding(s.mesh, config.mesh.rules), seed=config.seed,
      start_batch=start)
  iterator = build_iterator(position)
  train_step = make_train_step(s)
  writer = events.Writer(workdir) if jax.process_index() == 0 else events.NullWriter()
  if start_step == 0:
    writer.text(0, "config", events.config_markdown(schema.flatten(config)))

  parameter_names = [jax.tree_util.keystr(path) for path, _ in
                     jax.tree_util.tree_leaves_with_path(s.weights.abstract)]
  metrics = actions.Metrics(config, writer, start_step, parameter_names)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(s.abstract_state))
  saves = actions.Checkpoints(config, workdir, mngr, metrics, iterator, state_bytes)
  sample = sampling.build(config, s.objective.description, s.model.apply)
  params_of = lambda state: sampling_params(state, config)
  loop_actions = [metrics, saves, actions.SampleGrid(config, workdir, s.mesh, sample, writer,
                                                     params_of)]
  if config.eval.fid_every:
    loop_actions.append(actions.Fid(config, s.mesh, sample, writer, params_of))
  for action in loop_actions[2:]:  # trace the sampling actions with abstract shapes
    action.dry_run(checkpoint.abstract_with_shardings(s.weights.abstract, s.weights.shardings))

  started, rollbacks, step = time.perf_counter(), 0, start_step
  try:
    while step < training.num_steps:
      step += 1
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, step_metrics = train_step(state, next(iterator))
      metrics.add(step, step_metrics, iterator.position)
      last = step == training.num_steps
      try:
        for action in loop_actions:
          if action.due(step, last):
            action(step, state)
      except actions.NonFiniteLossError as error:
        if training.on_nonfinite == "stop" or rollbacks >= training.max_rollbacks:
          raise actions.NonFiniteLossError(error.step, error.position, error.what,
                                           _divergence_advice(mngr, config)) from None
        rollbacks += 1
        mngr.wait_until_finished()
        state = (init_state(s) if mngr.latest_step() is None
                 else checkpoint.restore(mngr, s.abstract_state)[0])
        step = int(state["step"])
        iterator = saves.iterator = build_iterator(error.position)
        metrics.restart(step)
        writer.scalars(step, {"rollbacks": rollbacks})
        console.info("rollback %d/%d: %s; restored step %d, skipping to batch %d",
                     rollbacks, training.max_rollbacks, error, step, error.position)
        continue
      if saves.stopping:
        console.info("preempted: saved step %d, exiting", step)
        break
  except BaseException:
    saves.close()
    writer.close()
    raise
  saves.finish()
  writer.close()
  if not saves.stopping and training.num_steps > start_step:
    console.info("done: steps %d-%d in %s; loss %.4f; checkpoints in %s", start_step + 1,
                 training.num_steps, console.duration(time.perf_counter() - started),
                 metrics.last.get("loss", float("nan")), checkpoint.directory(workdir))
  return state

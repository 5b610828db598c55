"""Training: the loop over periodic actions.

  config -> train_state.setup (config.validate, mesh, state.Weights, optimizer, shardings)
  -> the train state restored or initialised in its shardings -> data iterator
  -> train_step(state, batch) (jit, donated state) -> metrics kept on the device
  -> the actions due at this step: metrics (fetched only here), checkpoint, then the sampling
     actions the caller hands in (sample grid, FID)

Before the first step: the config is validated, a resumed run's config is compared with its
checkpoint's (`config.check_resume`), a damaged newest checkpoint is set aside for an older one
(`checkpoint.set_aside_damaged`, `checkpoint.restore`), and the sampling actions are traced with
abstract shapes, so nothing that would fail at step N fails after N steps of work. A non-finite
(or, with training.spike_factor, spiking) loss or gradient stops the run naming the step and
what went non-finite, or with training.on_nonfinite='rollback_skip' restores the newest
checkpoint and skips every batch since it.

The train state, its initial value and the jitted step are train_state.py's (re-exported here
for the loop's callers). Nothing here knows a particular objective, the VAE or Inception: the
actions that sample are built by `sampling_actions(context)`, which the caller passes (main.py:
evaluate.training_actions, with the VAE-decoded grid and the in-loop FID); without it the loop
draws undecoded grids and refuses eval.fid_every.
"""
import time

import jax

from kdiff_jax import actions, checkpoint, config as config_lib, console, data, events, parallel
from kdiff_jax import sampling, schema
from kdiff_jax.train_state import (  # noqa: F401 -- the loop's callers and tests reach them here
    FIRST_NONFINITE_GRADIENT, Setup, init_state, make_optimizer, make_train_step,
    sampling_params, setup)


def plain_grids(context: actions.Sampling) -> list:
  """The loop's sampling actions when the caller hands none: undecoded sample grids (no FID:
  train_and_evaluate refuses eval.fid_every with these at start)."""
  return [actions.SampleGrid(context)]


def _header(config, workdir, run: Setup, start_step: int, source: str, imported: bool) -> None:
  model, objective = config.model, config.objective
  size = (f"{model.size}/{model.patch_size}" if model.name != "mlp"
          else f"{model.mlp_width}x{model.mlp_depth}")
  console.info("kdiff_jax train %s-> %s", f"{source} " if source else "", workdir)
  console.info("  model %s %s, %s parameters; objective %s (%s); data %s %dx%dx%d",
               model.name, size, f"{run.model.num_params:,}", objective.name, objective.schedule,
               config.data.name, config.data.image_size, config.data.image_size,
               config.data.channels)
  console.info("  mesh %s on %d %s device(s), %d process(es); global batch %d",
               parallel.describe(run.mesh), run.mesh.size, jax.devices()[0].platform,
               jax.process_count(), config.training.batch_size)
  console.info("  %s; %d steps to go",
               f"resumed from step {start_step}" if start_step else "starting at step 0",
               config.training.num_steps - start_step)
  if imported:   # a step-0 checkpoint is written only by --mode=import
    console.info("  from the imported weights: the network, its EMA weights%s start at them; "
                 "a fresh optimizer state",
                 " and the teacher" if run.objective.teacher_decay else "")


def _restore_or_init(run: Setup, mngr, workdir: str, allow_config_change=()):
  """(state, data position): the newest checkpoint that restores, checked against the config, or
  the initial state when there is none. Visibly damaged newer steps are set aside first, so the
  config compared is the one of the step that will restore."""
  checkpoint.set_aside_damaged(mngr)
  saved_step = mngr.latest_step()
  if saved_step is None:
    return init_state(run), 0
  changed = config_lib.check_resume(checkpoint.load_config(workdir, saved_step), run.config,
                                    step=saved_step, allowed=allow_config_change)
  if changed:
    console.info("resuming with changed fields: %s", "; ".join(
        f"{path}: {old!r} -> {new!r}" for path, (old, new) in changed.items()))
  return checkpoint.restore(mngr, run.abstract_state)


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
                       devices=None, sampling_actions=plain_grids):
  """Train (resuming from the newest checkpoint in workdir) and return the final state.

  source: where the config came from (the config file), for the console header.
  allow_config_change: fields a resumed run may change although config.check_resume refuses.
  devices: the devices of the mesh (default: all).
  sampling_actions(context: actions.Sampling) -> the actions that sample (grids, FID); main.py
  passes evaluate.training_actions.
  """
  if config.eval.fid_every and sampling_actions is plain_grids:
    raise ValueError(f"eval.fid_every={config.eval.fid_every}: the in-loop FID is built by the "
                     "caller (main.py passes sampling_actions=evaluate.training_actions)")
  run = setup(config, devices)
  training = config.training
  mngr = checkpoint.manager(workdir, config.checkpoint)
  try:
    state, position = _restore_or_init(run, mngr, workdir, allow_config_change)
  except BaseException:
    mngr.close()
    raise
  start_step = int(state["step"])
  _header(config, workdir, run, start_step, source, imported=mngr.latest_step() == 0)

  build_iterator = lambda start: data.build_iterator(
      config.data, global_batch_size=training.batch_size,
      sharding=parallel.batch_sharding(run.mesh, config.mesh.rules), seed=config.seed,
      start_batch=start)
  iterator = build_iterator(position)
  train_step = make_train_step(run)
  writer = events.Writer(workdir) if jax.process_index() == 0 else events.NullWriter()
  if start_step == 0:
    writer.text(0, "config", events.config_markdown(schema.flatten(config)))

  parameter_names = [jax.tree_util.keystr(path) for path, _ in
                     jax.tree_util.tree_leaves_with_path(run.weights.abstract)]
  metrics = actions.Metrics(config, writer, start_step, parameter_names)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(run.abstract_state))
  saves = actions.Checkpoints(config, workdir, mngr, metrics, iterator, state_bytes)
  context = actions.Sampling(
      config=config, workdir=workdir, mesh=run.mesh, writer=writer,
      sample=sampling.build(config, run.objective.description, run.model.apply),
      params_of=lambda state: sampling_params(state, config))
  sampling_loop_actions = sampling_actions(context)
  abstract_params = checkpoint.abstract_with_shardings(run.weights.abstract, run.weights.shardings)
  for action in sampling_loop_actions:  # traced with abstract shapes: a failure shows now
    action.dry_run(abstract_params)
  loop_actions = [metrics, saves, *sampling_loop_actions]

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
          saves.wait()   # the newest checkpoint named is one that is committed
          raise actions.NonFiniteLossError(error.step, error.position, error.what,
                                           _divergence_advice(mngr, config)) from None
        rollbacks += 1
        saves.wait()
        state = (init_state(run) if mngr.latest_step() is None
                 else checkpoint.restore(mngr, run.abstract_state)[0])
        step = int(state["step"])
        iterator = saves.iterator = build_iterator(error.position)
        metrics.restart(step)
        writer.scalars(step, {"rollbacks": rollbacks})
        console.info("rollback %d/%d: %s; restored step %d, skipping to batch %d",
                     rollbacks, training.max_rollbacks, error, step, error.position)
        continue
      if saves.stopping:
        saves.wait()
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

"""The training loop's periodic actions.

  Metrics      fetch the step metrics (only at log and checkpoint steps), check them, log them
  Checkpoints  save the state, announce a save once it is committed, watch for preemption,
               report a failed save
  SampleGrid   a PNG of samples, shown by the caller's `show` (evaluate.training_actions
               decodes latents with the VAE)

An action is due at some steps (`due(step, last)`) and is called with the step and the train
state (`action(step, state)`); `Sampling.params_of(state)` gives the weights to sample (the
trainer's EMA or raw params). It writes its own files, TensorBoard entries and one console
line. `dry_run(abstract_params)` traces a sampling action with abstract shapes before the first
step, so a sampler or an FID pipeline that cannot run fails at start, not after hours of
training. The trainer (train.py) runs them in this order, so a failing sample grid never costs a
checkpoint. Nothing here imports the VAE, Inception or the evaluator: the actions that need them
(the decoded grid, the in-loop FID) are built by the loop's caller (evaluate.training_actions,
which main.py hands to train.train_and_evaluate).
"""
import collections
import dataclasses
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from kdiff_jax import checkpoint, console, images, sampling
from kdiff_jax.train_state import FIRST_NONFINITE_GRADIENT

# Steps the host may dispatch before the device has finished the earlier ones. Each queued step
# holds a batch in device memory, and XLA:CPU's in-process collectives stall with an unbounded
# queue (8 simulated devices on 2 cores: a rendezvous timeout after a few hundred steps).
STEPS_AHEAD = 2


@dataclasses.dataclass(frozen=True)
class Sampling:
  """What the loop hands to the actions that sample: sample(params, noise, labels, key) of
  sampling.build, the mesh, the TensorBoard writer, and params_of(state), the weights to sample."""
  config: Any
  workdir: str
  mesh: jax.sharding.Mesh
  sample: Callable
  writer: Any
  params_of: Callable


class NonFiniteLossError(FloatingPointError):
  """A step whose loss or gradient is not finite, or whose loss spiked: `step`, the data
  `position` after it (batches consumed), and `what` went wrong."""

  def __init__(self, step: int, position: int, what: str, advice: str = ""):
    super().__init__(f"{what} at step {step}" + (f"; {advice}" if advice else ""))
    self.step, self.position, self.what = step, position, what


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
    console.info("SIGTERM: checkpointing after this step, then exiting")
    self.signalled = True

  def __call__(self, step: int) -> bool:
    if self.multihost:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signalled

  def close(self):
    if not self.multihost and hasattr(self, "previous"):
      signal.signal(signal.SIGTERM, self.previous)


class Metrics:
  """Keeps each step's metrics on the device; fetches them only when asked (log and checkpoint
  steps), checking that every loss and gradient is finite (and, with training.spike_factor, that
  no loss exceeds spike_factor times the mean of the last SPIKE_WINDOW); every
  training.log_every steps writes their means (and training.per_step_metrics at their own
  steps) to TensorBoard and one console line.

  In between, the host only waits (without fetching) for the step STEPS_AHEAD back to finish.
  """

  SPIKE_WINDOW = 100

  def __init__(self, config, writer, start_step: int, parameter_names):
    self.every = config.training.log_every
    self.per_step = set(config.training.per_step_metrics)
    self.spike_factor = config.training.spike_factor
    self.num_steps = config.training.num_steps
    self.batch_size = config.training.batch_size
    self.writer = writer
    self.parameter_names = parameter_names
    self.recent = collections.deque(maxlen=self.SPIKE_WINDOW)
    self.last = {}
    self.restart(start_step)

  def restart(self, step: int) -> None:
    """Forget what was not yet written (after a rollback to `step`)."""
    self.pending, self.history = [], []   # (step, position, device metrics), (step, {name: float})
    self.mark = (step, time.perf_counter())

  def add(self, step: int, metrics, position: int) -> None:
    self.pending.append((step, position, metrics))
    if len(self.pending) > STEPS_AHEAD:
      jax.block_until_ready(self.pending[-STEPS_AHEAD - 1][2]["loss"])

  def _check(self, step: int, position: int, values: dict) -> None:
    bad = int(values.pop(FIRST_NONFINITE_GRADIENT))
    loss = values["loss"]
    what = ""
    if not math.isfinite(loss) or bad >= 0:
      what = (f"non-finite loss {loss}" if not math.isfinite(loss) else f"loss {loss:.4g}")
      what += f", gradient norm {values['grad_norm']:.4g}"
      if bad >= 0:
        what += f", first non-finite gradient: {self.parameter_names[bad]}"
    elif (self.spike_factor and len(self.recent) >= 10
          and loss > self.spike_factor * np.mean(self.recent)):
      what = (f"loss spike {loss:.4g} > training.spike_factor={self.spike_factor:g} x the mean "
              f"{np.mean(self.recent):.4g} of the last {len(self.recent)} steps")
    if what:
      raise NonFiniteLossError(step, position, what)
    self.recent.append(loss)

  def fetch(self) -> None:
    """Move the pending metrics to the host; raise at the first step that went wrong."""
    fetched = jax.device_get([metrics for _, _, metrics in self.pending])
    for (step, position, _), metrics in zip(self.pending, fetched):
      values = {name: float(value) for name, value in metrics.items()}
      self._check(step, position, values)
      self.history.append((step, values))
    self.pending = []

  def due(self, step: int, last: bool) -> bool:
    return last or step % self.every == 0

  def __call__(self, step: int, state) -> None:
    self.fetch()
    if not self.history:
      return
    names = self.history[-1][1]
    for own_step, values in self.history:
      if self.per_step & set(values):
        self.writer.scalars(own_step, {n: values[n] for n in names if n in self.per_step})
    means = {n: float(np.mean([v[n] for _, v in self.history])) for n in names
             if n not in self.per_step}
    start_step, start_time = self.mark
    now = time.perf_counter()
    steps_per_second = (step - start_step) / max(now - start_time, 1e-9)
    self.writer.scalars(step, {**means, "steps_per_second": steps_per_second})
    remaining = (self.num_steps - step) / max(steps_per_second, 1e-9)
    console.info("step %d/%d  loss %.4f  %.2f steps/s  %.0f images/s  ETA %s", step,
                 self.num_steps, means.get("loss", float("nan")), steps_per_second,
                 steps_per_second * self.batch_size, console.duration(remaining))
    self.last = means
    self.history = []
    self.mark = (step, now)


class Checkpoints:
  """Every training.checkpoint_every steps, at the last step and at a preemption: the state,
  the data position and the config, after checking every pending loss (never a NaN on disk).

  A save is announced ("checkpoint step N -> path") once it is committed: at once when saves
  are synchronous; with checkpoint.async_save, at the first step boundary after Orbax has
  finished it in the background (or at the next save or the end, which wait for it). A save
  that fails, at once or in the background, stops the run at that boundary naming the step
  whose save failed, the cause (e.g. no space left on device), the newest intact checkpoint and
  how much a save writes.
  """

  def __init__(self, config, workdir: str, mngr, metrics: Metrics, iterator, state_bytes: int):
    self.config = config
    self.directory = checkpoint.directory(workdir)
    self.every = config.training.checkpoint_every
    self.mngr = mngr
    self.metrics = metrics
    self.iterator = iterator
    self.state_bytes = state_bytes
    self.preempted = PreemptionWatch()
    self.stopping = False
    self.in_flight = None  # the step of an async save not yet known to be committed

  def failure(self, step: int, error: BaseException) -> checkpoint.CheckpointError:
    intact = [saved for saved in self.mngr.all_steps() if saved != step]
    newest = (f"the newest intact checkpoint is step {max(intact)} under {self.directory}"
              if intact else f"no checkpoint under {self.directory} is intact yet")
    cause = checkpoint.describe_error(error)
    remedy = ("free that much space" if cause == checkpoint.NO_SPACE else
              "make room for that much and fix the cause")
    return checkpoint.CheckpointError(
        f"saving checkpoint step {step} failed ({cause}); {newest}; a save writes about "
        f"{console.size(self.state_bytes)}: {remedy} and run the same command again to resume")

  def _commit(self) -> None:
    """Wait for the save in flight; announce it, or raise its failure."""
    step, self.in_flight = self.in_flight, None
    try:
      self.mngr.wait_until_finished()
      self.mngr.check_for_errors()
    except Exception as error:  # noqa: BLE001 -- any failed save stops the run, said clearly
      raise self.failure(step, error) from error
    console.info("checkpoint step %d -> %s/%d", step, self.directory, step)

  def check(self) -> None:
    """At a step boundary: announce the save in flight if Orbax has finished it, or raise its
    failure. Never waits for a save still being written. With several processes a save's end is
    seen at the next save or the end of the run, where every process waits for it at the same
    step (each process sees the background save finish at its own step boundary)."""
    if (self.in_flight is not None and jax.process_count() == 1
        and not self.mngr.is_saving_in_progress()):
      self._commit()

  def due(self, step: int, last: bool) -> bool:
    self.check()
    self.stopping = self.preempted(step)  # every process asks at every step
    return last or self.stopping or step % self.every == 0

  def __call__(self, step: int, state) -> None:
    self.metrics.fetch()
    if self.in_flight is not None:   # Orbax would wait for it inside save(); say which failed
      self._commit()
    try:
      checkpoint.save(self.mngr, step, state, self.iterator.position, self.config)
    except Exception as error:  # noqa: BLE001
      raise self.failure(step, error) from error
    self.in_flight = step
    if not self.config.checkpoint.async_save:
      self._commit()

  def wait(self) -> None:
    """Wait for the save in flight, if any; announce it or raise its failure."""
    if self.in_flight is not None:
      self._commit()

  def finish(self) -> None:
    """Wait for the last save; announce it or raise its failure; release the manager."""
    try:
      self.wait()
    finally:
      self.close()

  def close(self) -> None:
    """Release the manager and the SIGTERM handler (after a failure too, quietly)."""
    self.preempted.close()
    try:
      self.mngr.close()
    except Exception:  # noqa: BLE001 -- the run already failed; that error is the one to report
      pass


def first_channels(samples) -> np.ndarray:
  """Samples as they are, at most three channels (a latent model's grid without its decoder)."""
  return np.asarray(samples, np.float32)[..., :3]


class SampleGrid:
  """Every training.sample_every steps and at the last: a grid_size² PNG of samples cycling
  through the classes, under workdir/samples, and in TensorBoard. show(samples) makes them
  images in about [-1, 1] (default: at most their first three channels)."""

  def __init__(self, context: Sampling, show: Callable = first_channels):
    config = context.config
    self.config = config
    self.params_of = context.params_of
    self.show = show
    self.every = config.training.sample_every
    self.directory = os.path.join(context.workdir, "samples")
    self.writer = context.writer
    labels = sampling.cycling_labels(config.sampling.grid_size**2,
                                     sampling.all_classes(config))
    self.draw = sampling.make_sampler(config, context.sample, context.mesh, labels)

  def due(self, step: int, last: bool) -> bool:
    return last or (self.every > 0 and step % self.every == 0)

  def dry_run(self, abstract_params) -> None:
    jax.eval_shape(self.draw, abstract_params, jax.random.key(0))

  def __call__(self, step: int, state) -> None:
    key = jax.random.fold_in(jax.random.key(self.config.sampling.seed), step)
    shown = self.show(self.draw(self.params_of(state), key))
    if jax.process_index() == 0:
      path = os.path.join(self.directory, f"step_{step:08d}.png")
      grid = images.save_grid(shown, path)
      self.writer.images(step, {"samples": grid})
      console.info("samples   step %d -> %s", step, path)

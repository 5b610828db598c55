"""Orbax checkpoints under workdir/checkpoints: the train state in items, the data position, the config.

A step directory holds one item per part of the train state, so a reader takes only what it
needs:

  params      the raw weights {'net': ..., **the objective's extra params}
  ema         {key: weights} for each of training.ema_halflives_kimg ('500kimg') and
              training.ema_decays ('0.9999') (`ema_keys`; absent without EMA)
  opt_state   the optimizer's moments and counters (training only)
  train       {'step', 'rng'} and, for an objective with a teacher (TVM), {'teacher': weights}
  data        {'position': batches consumed} (JSON)
  config      the run's config (JSON)

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it), keep
the newest `checkpoint.max_to_keep`, and restore straight into the shardings of the current
mesh, so a checkpoint written on one topology restores on another. `restore_weights` reads one
set of weights (one EMA, or the raw ones) and nothing else: sampling, evaluation and export never
read the optimizer state.

A step that does not restore (a deleted, truncated or empty file, an empty step folder, data
that does not read) never blocks a run: `set_aside_damaged` and `restore` name the step and
the damage in a sentence, move the step aside (checkpoints/300 -> checkpoints/300.damaged;
nothing is deleted) and fall back to the newest step that restores;
`restore_weights` skips it without moving anything. With checkpoints present and none
restoring, it is an error, never a silent fresh start.
"""
import errno
import json
import os
import re

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath

from kdiff_jax import console, schema

STATE_ITEMS = ("params", "ema", "opt_state", "train")
ITEMS = STATE_ITEMS + ("data", "config")
# Files every array item has (Orbax's PyTree layout: tree metadata, OCDBT manifest), and the
# JSON file of a JSON item; the first of each is JSON.
ITEM_FILES = {**{item: ("_METADATA", "manifest.ocdbt") for item in STATE_ITEMS},
              "data": ("metadata",), "config": ("metadata",)}


NO_SPACE = "no space left on device"   # describe_error's words for a full disk


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be written or read, said in one line with what to do."""


def directory(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def manager(workdir: str, checkpoint_config) -> ocp.CheckpointManager:
  """The training run's manager (it creates workdir/checkpoints)."""
  _use_replica_parallel_across_processes_only()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=checkpoint_config.max_to_keep,
      enable_async_checkpointing=checkpoint_config.async_save,
      create=True)
  return ocp.CheckpointManager(directory(workdir), options=options, item_names=ITEMS)


def _use_replica_parallel_across_processes_only() -> None:
  """Orbax's jax.Array handler, writing replicated shards replica-parallel only across processes.

  Replica-parallel saving splits each replicated shard among its replicas so that several hosts
  share the writing. In one process every replica is local and the split buys nothing: it costs
  an eager slice per replica and shard (a tiny U-Net's train state replicated over 8 CPU devices
  saved in 9.7 s with it, 0.3 s without). Orbax's handlers live in one process-wide registry.
  The handler goes without Orbax's per-array metadata store: it records typed PRNG keys only,
  and the train state keeps its key as uint32 key data.
  """
  handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1)
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax warns of every override, this one too
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    absl_logging.set_verbosity(verbosity)


def ema_key(decay: float) -> str:
  """The key of a constant-decay EMA in state['ema'] (and in the 'ema' item)."""
  return f"{decay:g}"


def halflife_key(halflife_kimg: float) -> str:
  """The key of a half-life EMA (EDM's, in thousands of images) in state['ema']."""
  return f"{halflife_kimg:g}kimg"


def ema_keys(training_config) -> list:
  """The keys of the EMAs a run keeps: its half-lives', then its constant decays'."""
  return ([halflife_key(h) for h in training_config.ema_halflives_kimg]
          + [ema_key(d) for d in training_config.ema_decays])


def sampling_ema(config):
  """The key of the EMA that sampling, evaluation and export read: sampling.ema_halflife_kimg's
  (config.check refuses one the run did not keep), else the first kept; None without EMA."""
  if config.sampling.ema_halflife_kimg:
    return halflife_key(config.sampling.ema_halflife_kimg)
  keys = ema_keys(config.training)
  return keys[0] if keys else None


def _state_items(state) -> dict:
  """The train state {step, params, opt_state, ema, rng} as the checkpoint's items."""
  items = {"params": state["params"], "opt_state": state["opt_state"],
           "train": {"step": state["step"], "rng": state["rng"]}}
  if "teacher" in state:  # an objective's EMA teacher (objectives.Objective.teacher_decay)
    items["train"]["teacher"] = state["teacher"]
  if state["ema"]:
    items["ema"] = state["ema"]
  return items


def save(mngr, step: int, state, data_position: int, config) -> None:
  args = {name: ocp.args.StandardSave(item) for name, item in _state_items(state).items()}
  mngr.save(step, args=ocp.args.Composite(
      data=ocp.args.JsonSave({"position": int(data_position)}),
      config=ocp.args.JsonSave(config.to_dict()), **args))


def restore(mngr, abstract_state, step=None):
  """(state, data_position) at `step` (default: the newest that restores), placed by the
  abstract state's shardings. Newer steps that do not restore are moved aside (`set_aside`)."""
  args = {name: ocp.args.StandardRestore(item)
          for name, item in _state_items(abstract_state).items()}
  composite = ocp.args.Composite(data=ocp.args.JsonRestore(), **args)
  if step is None:
    step, restored = _newest_restorable(mngr, lambda s: mngr.restore(s, args=composite),
                                        move_aside=True)
  else:
    try:
      restored = mngr.restore(step, args=composite)
    except Exception as error:  # noqa: BLE001 -- said in a sentence, as for the newest step
      raise CheckpointError(f"checkpoint step {step} does not restore: "
                            f"{_describe_failure(mngr.directory, step, error)}") from error
  state = {"step": restored["train"]["step"], "rng": restored["train"]["rng"],
           "params": restored["params"], "opt_state": restored["opt_state"],
           "ema": restored["ema"] if abstract_state["ema"] else {}}
  if "teacher" in abstract_state:
    state["teacher"] = restored["train"]["teacher"]
  return state, restored["data"]["position"]


def _files(directory) -> list:
  """Every file under an epath directory (epath has no recursive glob on every filesystem)."""
  found = []
  for child in directory.iterdir():
    found.extend(_files(child) if child.is_dir() else [child])
  return found


def damage(step_directory) -> str:
  """What is visibly damaged in a step directory: a missing or empty item, a missing, empty or
  unreadable metadata file, or an empty file; "" when nothing is."""
  step_directory = epath.Path(step_directory)
  for item in ITEMS:
    path = step_directory / item
    if not path.exists():
      if item != "ema":  # absent without EMA decays
        return f"{path} is missing"
      continue
    files = _files(path)
    if not files:
      return f"{path} is empty"
    for name in ITEM_FILES[item]:
      if not (path / name).exists():
        return f"{path / name} is missing"
    try:
      json.loads((path / ITEM_FILES[item][0]).read_text())
    except ValueError:
      return f"{path / ITEM_FILES[item][0]} is not valid JSON (truncated?)"
    for file in files:
      if file.stat().length == 0:
        return f"{file} is empty"
  return ""


def describe_error(error: BaseException) -> str:
  """An error of Orbax or TensorStore in a few words: "no space left on device" wherever in its
  chain the disk ran full; else its type, status code and first line, cut to 160 characters."""
  chain, seen = [error], set()
  while chain[-1] is not None and id(chain[-1]) not in seen:
    seen.add(id(chain[-1]))
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  for link in chain[:-1]:
    if ((isinstance(link, OSError) and link.errno == errno.ENOSPC)
        or "No space left on device" in str(link) or "os_error_code='28'" in str(link)):
      return NO_SPACE
  first_line = (str(error).strip().splitlines() or [""])[0]
  if len(first_line) > 160:
    first_line = first_line[:157] + "..."
  return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__


def _describe_failure(root, step: int, error: BaseException) -> str:
  """Why checkpoints/<step> does not restore, in a sentence: its damaged file, else the item
  whose data does not read and the restore error's status."""
  found = damage(epath.Path(root) / str(step))
  if found:
    return found
  item = re.search(rf"[/\\]{step}[/\\]([a-z_]+)[/\\]", str(error))
  status = re.match(r"\s*([A-Z_]{4,}):", str(error))
  if item and item.group(1) in ITEMS:
    return (f"the data of its '{item.group(1)}' item does not read"
            f" ({status.group(1) if status else type(error).__name__})")
  return f"it does not restore ({describe_error(error)})"


def set_aside_damaged(mngr) -> None:
  """Move the newest steps whose files are visibly damaged (`damage`: a step folder without a
  config, an empty item, a missing or empty file) aside, down to the newest that looks intact,
  so that a resume reads that step's config. What no file shows (unreadable data) `restore`
  finds."""
  failures = []
  for step in sorted(mngr.all_steps(), reverse=True):
    reason = damage(epath.Path(mngr.directory) / str(step))
    if not reason:
      return
    failures.append(f"step {step}: {reason}")
    moved = set_aside(mngr.directory, step)
    mngr.reload()
    console.info("checkpoint step %d is damaged (%s); moved it to %s", step, reason, moved)
  if failures:
    raise CheckpointError(f"no checkpoint under {mngr.directory} restores "
                          f"({'; '.join(failures)}); they are kept (as <step>.damaged); start a "
                          "new --workdir or repair them")


def set_aside(root, step: int) -> str:
  """Rename checkpoints/<step> to <step>.damaged (.damaged.1, ... if taken); return the new path.
  Only process 0 renames; every process waits for it."""
  root = epath.Path(root)
  target = root / f"{step}.damaged"
  index = 0
  while target.exists():
    index += 1
    target = root / f"{step}.damaged.{index}"
  if jax.process_index() == 0:
    (root / str(step)).rename(target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"kdiff_jax set aside checkpoint {step}")
  return str(target)


def _newest_restorable(mngr, restore_step, *, move_aside: bool):
  """(step, restore_step(step)) of the newest step that restores; older ones are tried after a
  failure, which is reported (and the step moved aside when move_aside)."""
  steps = sorted(mngr.all_steps(), reverse=True)
  failures = []
  for step in steps:
    try:
      return step, restore_step(step)
    except Exception as error:  # noqa: BLE001 -- any damage: report it, try the next older step
      reason = _describe_failure(mngr.directory, step, error)
      failures.append(f"step {step}: {reason}")
      if move_aside:
        moved = set_aside(mngr.directory, step)
        mngr.reload()
        console.info("checkpoint step %d is damaged (%s); moved it to %s and trying the next "
                     "older step", step, reason, moved)
      else:
        console.info("checkpoint step %d is damaged (%s); trying the next older step", step,
                     reason)
  raise CheckpointError(f"no checkpoint under {mngr.directory} restores ({'; '.join(failures)}); "
                        "they are kept (as <step>.damaged); start a new --workdir or repair them")


def _reader(workdir: str) -> ocp.CheckpointManager:
  """A manager that only reads: it creates nothing, and a missing checkpoint is an error."""
  if not os.path.isdir(directory(workdir)):
    raise FileNotFoundError(f"--workdir={workdir}: no checkpoint under {directory(workdir)}")
  mngr = ocp.CheckpointManager(directory(workdir), item_names=ITEMS,
                               options=ocp.CheckpointManagerOptions(create=False))
  if mngr.latest_step() is None:
    mngr.close()
    raise FileNotFoundError(f"--workdir={workdir}: no checkpoint under {directory(workdir)}")
  return mngr


def restore_weights(workdir: str, abstract_params, ema=None, step=None):
  """(params, step): the weights of the EMA keyed `ema` (`ema_keys`; the raw weights when None)
  at `step` (default: the latest), placed by the abstract params' shardings. Reads nothing
  else."""
  if ema is None:
    args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
    read = lambda restored: restored["params"]
  else:
    wanted = {ema: abstract_params}
    args = ocp.args.Composite(ema=ocp.args.PyTreeRestore(
        item=wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
        partial_restore=True))
    read = lambda restored: restored["ema"][ema]
  mngr = _reader(workdir)
  try:
    if step is None:
      return _newest_restorable(mngr, lambda s: read(mngr.restore(s, args=args)),
                                move_aside=False)[::-1]
    return read(mngr.restore(step, args=args)), step
  finally:
    mngr.close()


def load_config(workdir: str, step=None):
  """The config saved with the checkpoint at `step` (default: the newest step whose config
  reads), over the schema's defaults (schema.from_dict).

  Reads the JSON file that the 'config' item is (Orbax's JsonSave writes <step>/config/metadata)
  without Orbax, so that it starts no JAX backend: main.py reads it before
  jax.distributed.initialize.
  """
  root = epath.Path(directory(workdir))
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []
  if not steps:
    raise FileNotFoundError(f"--workdir={workdir}: no checkpoint under {root}")
  for candidate in ([step] if step is not None else steps[::-1]):
    path = root / str(candidate) / "config" / "metadata"
    try:
      saved = json.loads(path.read_text())
    except (OSError, ValueError):
      if step is not None:
        raise
      continue  # a damaged step: the restore that follows names it
    return schema.from_dict(saved)
  raise CheckpointError(f"--workdir={workdir}: no checkpoint under {root} has a readable config "
                        "(config/metadata); start a new --workdir or repair them")


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

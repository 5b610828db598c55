"""Orbax checkpoints: the train state, the data position and the config, under workdir/checkpoints.

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it), keep
the newest `checkpoint.max_to_keep`, and restore straight into the shardings of the current
mesh, so a checkpoint written on one topology restores on another.
"""
import os

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, checkpoint_config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=checkpoint_config.max_to_keep,
      enable_async_checkpointing=checkpoint_config.async_save,
      create=True)
  return ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options,
                               item_names=("state", "data", "config"))


def save(mngr, step: int, state, data_position: int, config) -> None:
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave({"position": int(data_position)}),
      config=ocp.args.JsonSave(config.to_dict())))


def restore(mngr, abstract_state, step=None):
  """(state, data_position) at `step` (default: the latest), placed by the abstract state's shardings."""
  step = mngr.latest_step() if step is None else step
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]["position"]


def load_state(workdir: str, checkpoint_config, abstract_state, step=None):
  """The train state at `step` (default: the latest) for the sample, eval and export modes."""
  mngr = manager(workdir, checkpoint_config)
  try:
    if mngr.latest_step() is None:
      raise FileNotFoundError(f"--workdir={workdir}: no checkpoint under {workdir}/checkpoints")
    state, _ = restore(mngr, abstract_state, step)
  finally:
    mngr.close()
  return state


def restore_config(workdir: str, step=None) -> dict:
  """The config dict saved with a checkpoint (to rebuild its model for sampling or export)."""
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("config",))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
  return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

"""Checkpoint <-> PyTorch files: export a trained checkpoint, import a DiT / JiT state_dict.

Export (`main.py --mode=export`) restores the raw and EMA weights of the checkpoint in workdir
(never the optimizer state) and writes, under config.export.output_dir (default
<workdir>/export), for step N:

  stepN.safetensors  the torch state_dict of the EMA weights (the EMA sampling.ema_halflife_kimg
                     chooses, else the first kept: checkpoint.sampling_ema), or the raw weights
                     with export.use_ema=False; the JSON below is also in its metadata
  stepN.pt           {"model": raw state_dict, "ema": EMA state_dict} (DiT's checkpoint layout;
                     no "ema" without EMA), written only where torch is installed
  stepN_immprecond.pt  IMM runs (DiT or U-Net): the exported weights as lumalabs/imm's IMMPrecond
                     state_dict (keys 'model.*'), loading with strict=True into
                     IMMPrecond(**meta['imm_precond'])
  stepN.json         what rebuilds and samples the model in PyTorch (`meta`): constructor kwargs
                     of torch_dit.DiT / torch_jit.JiT, objective (schedule, parameterization, sigma_d,
                     k-Diff's learned w_k, IMM's map and time conditioning), sampler settings
                     with the time grid, and the training config

Import (`import_state_dict`, `main.py --mode=import --import_from=...`) turns a
facebookresearch/DiT-format state_dict (.pt or .safetensors), an EDM / IMM SongUNet one, or
lumalabs/imm's IMMPrecond state_dict or pickle (pretrained.py) into Flax net params, and
`init_workdir` writes them as the step-0 checkpoint of a workdir, which `main.py --mode=train`
then fine-tunes (fresh optimizer; every EMA starts at the imported weights).
"""
import json
import os

import jax
import numpy as np
from safetensors import numpy as safetensors_numpy

from kdiff_jax import checkpoint, config as config_lib, console, objectives, parallel
from kdiff_jax import sampling, state, train_state
from kdiff_jax.export import convert, pretrained

# 2: objective.torch_sampler names the PyTorch sampler; iMF is objective.name = "imf".
FORMAT = "kdiff_jax.export/2"


def sampling_meta(config, description) -> dict:
  """The configured sampler: method, the float64 time grid it runs on, guidance."""
  chosen = config.sampling
  return dict(method=chosen.method, num_steps=chosen.num_steps,
              times=np.asarray(sampling.time_grid(config, description)).tolist(),
              t_start=chosen.t_start, t_end=chosen.t_end, guidance_scale=chosen.guidance_scale,
              guidance_interval=list(chosen.guidance_interval))


def objective_meta(config, description, params_by_weights: dict) -> dict:
  """Schedule, sigma_d (noise_std), the name of the PyTorch sampler (`torch_sampler`, absent
  where none samples the objective) and what the description says of the trained network
  (`description.export`: a denoiser's prediction and k-Diff's k, IMM's map and time
  conditioning, TVM's output scale).

  params_by_weights: {'model': raw params, 'ema': EMA params (if any)}, for k-Diff's learned k.
  """
  cfg = config.objective
  meta = dict(name=cfg.name, schedule=cfg.schedule, noise_std=cfg.noise_std,
              min_divisor=cfg.min_divisor)
  if description.torch_sampler is not None:
    meta["torch_sampler"] = description.torch_sampler
  meta.update(description.export(config, params_by_weights))
  return meta


def metadata(config, params_by_weights: dict, *, exported: str, step: int, stem: str) -> dict:
  """The export's JSON: model kwargs, objective, sampler, which weights, files, training config."""
  ema = checkpoint.sampling_ema(config) if "ema" in params_by_weights else None
  description = objectives.describe(config)
  meta = dict(
      format=FORMAT,
      model=convert.model_spec(config),
      objective=objective_meta(config, description, params_by_weights),
      sampling=sampling_meta(config, description),
      weights=dict(safetensors=exported, step=step,
                   ema=ema),
      files=dict(safetensors=stem + ".safetensors", pt=stem + ".pt"),
      layout="torch NCHW; t in [0, 1] with t = 0 data, t = 1 noise; label num_classes = null",
      config=json.loads(config.to_json()),
  )
  precond = pretrained.imm_precond_export(config)
  if precond is not None:
    meta["imm_precond"] = precond
    meta["files"]["imm_precond"] = stem + "_immprecond.pt"
  return meta


def export_checkpoint(config, workdir: str, step=None) -> dict:
  """Write stepN.{safetensors, pt, json} of the checkpoint in workdir; return their paths."""
  config_lib.validate(config)
  convert.model_spec(config)  # fails before restoring for a model torch_load cannot build
  weights = state.Weights(config, parallel.make_mesh(config.mesh))
  raw, step = weights.restore(workdir, use_ema=False, step=step)
  params_by_weights = {"model": jax.device_get(raw)}
  if checkpoint.sampling_ema(config) is not None:
    params_by_weights["ema"] = jax.device_get(weights.restore(workdir, use_ema=True, step=step)[0])
  exported = "ema" if config.export.use_ema and "ema" in params_by_weights else "model"
  if config.export.use_ema and exported == "model":
    console.info("export: export.use_ema=True but the run keeps no EMA: exporting the "
                 "raw weights")

  state_dicts = {name: convert.net_to_torch(config, params["net"])
                 for name, params in params_by_weights.items()}
  output_dir = config.export.output_dir or os.path.join(workdir, "export")
  stem = f"step{step}"
  meta = metadata(config, params_by_weights, exported=exported, step=step, stem=stem)
  paths = {kind: os.path.join(output_dir, f"{stem}.{kind}")
           for kind in ("safetensors", "pt", "json")}
  if "imm_precond" in meta:
    paths["imm_precond"] = os.path.join(output_dir, meta["files"]["imm_precond"])
  if jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    safetensors_numpy.save_file(state_dicts[exported], paths["safetensors"],
                                metadata={"kdiff_jax": json.dumps(meta)})
    with open(paths["json"], "w") as f:
      json.dump(meta, f, indent=2)
    if not _write_pt(state_dicts, paths["pt"]):
      del paths["pt"]
    if "imm_precond" in paths and not _write_pt(
        pretrained.to_imm_precond(state_dicts[exported]), paths["imm_precond"]):
      del paths["imm_precond"]
  console.info("export: step %d (%s weights) -> %s", step, exported, output_dir)
  return paths


def _write_pt(state_dicts, path) -> bool:
  """torch.save(state_dicts) ({'model': ..., 'ema': ...}, or one state_dict) if torch is
  installed (the only torch use here)."""
  try:
    import torch
  except ImportError:
    console.info("export: torch is not installed: wrote no %s (the .safetensors holds the same "
                 "weights)", path)
    return False
  to_torch = lambda tree: (torch.from_numpy(tree) if isinstance(tree, np.ndarray)
                           else {key: to_torch(value) for key, value in tree.items()})
  torch.save(to_torch(state_dicts), path)
  return True


# --- import ---------------------------------------------------------------------------------------

def import_state_dict(state_dict, config, *, drop_learned_sigma: bool = False) -> dict:
  """Flax net params (a pure dict, `state['params']['net']`) of config's model from a torch
  DiT / JiT state_dict, or lumalabs/imm's IMMPrecond one (keys 'model.*', pretrained.py); see
  convert.from_torch for drop_learned_sigma."""
  convert.model_spec(config)
  state_dict = pretrained.network_state_dict(state_dict, config.data.num_classes)
  return convert.net_from_torch(config, state_dict, drop_learned_sigma=drop_learned_sigma)


def init_workdir(config, workdir: str, net_params) -> None:
  """Save a step-0 checkpoint in workdir whose network, EMA and teacher (TVM) weights are
  net_params.

  `main.py --config=... --workdir=...` then resumes from it: fine-tuning with a fresh optimizer
  (and the objective's initial extra parameters, e.g. k-Diff's w_k).
  """
  setup = train_state.setup(config)
  mngr = checkpoint.manager(workdir, config.checkpoint)
  if mngr.latest_step() is not None:
    raise FileExistsError(f"--workdir={workdir} already has checkpoints: import into a new workdir")
  initial = train_state.init_state(setup)
  shardings = setup.state_shardings["params"]["net"]
  net = jax.tree.map(lambda value, sharding: jax.device_put(np.asarray(value), sharding),
                     net_params, shardings)
  initial["params"] = {**initial["params"], "net": net}
  initial["ema"] = {key: {**ema, "net": net} for key, ema in initial["ema"].items()}
  if "teacher" in initial:   # TVM's EMA teacher starts at the imported weights too
    initial["teacher"] = {**initial["teacher"], "net": net}
  checkpoint.save(mngr, 0, initial, 0, config)
  mngr.wait_until_finished()
  mngr.close()
  console.info("import: wrote the imported weights as step 0 of %s", workdir)

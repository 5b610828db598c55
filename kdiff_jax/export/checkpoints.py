"""Checkpoint <-> PyTorch files: export a trained checkpoint, import a DiT / JiT state_dict.

Export (`main.py --mode=export`) restores the raw and EMA weights of the checkpoint in workdir
(never the optimizer state) and writes, under config.export.output_dir (default
<workdir>/export), for step N:

  stepN.safetensors  the torch state_dict of the EMA weights (first decay), or the raw weights
                     with export.use_ema=False; the JSON below is also in its metadata
  stepN.pt           {"model": raw state_dict, "ema": EMA state_dict} (DiT's checkpoint layout;
                     no "ema" without EMA decays), written only where torch is installed
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
from flax import nnx
from safetensors import numpy as safetensors_numpy

from kdiff_jax import checkpoint, config as config_lib, console, models, objectives, parallel
from kdiff_jax import sampling, state, train_state
from kdiff_jax.export import convert, pretrained
from kdiff_jax.models import dit, imf_dit, jit, unet

# 2: objective.torch_sampler names the PyTorch sampler; iMF is objective.name = "imf".
FORMAT = "kdiff_jax.export/2"


def model_spec(config) -> dict:
  """torch_load.build's constructor kwargs of config's model, with its 'name' ('dit', 'jit', 'unet')."""
  model, data = config.model, config.data
  common = dict(input_size=data.image_size, patch_size=model.patch_size,
                in_channels=data.channels, mlp_ratio=model.mlp_ratio,
                num_classes=data.num_classes, time_scale=model.time_scale)
  if model.name == "dit":
    depth, hidden_size, num_heads = dit.SIZES[model.size]
    return dict(name="dit", hidden_size=hidden_size, depth=depth,
                num_heads=model.num_heads or num_heads,
                second_time_embedder=model.second_time_embedder, norm=model.norm,
                qk_norm=model.qk_norm, modulation_norm=model.modulation_norm,
                guidance_embedder=model.guidance_embedder, **common)
  if model.name == "jit":
    depth, hidden_size, num_heads, bottleneck_dim, in_context_len, in_context_start = (
        jit.SIZES[model.size])
    return dict(name="jit", hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                bottleneck_dim=bottleneck_dim, in_context_len=in_context_len,
                in_context_start=in_context_start, **common)
  if model.name == "unet":
    model_channels, channel_mult, num_blocks, attn_resolutions = unet.SIZES[model.size]
    return dict(name="unet", input_size=data.image_size, in_channels=data.channels,
                num_classes=data.num_classes if model.class_conditional else 0,
                model_channels=model_channels, channel_mult=list(channel_mult),
                num_blocks=num_blocks, attn_resolutions=list(attn_resolutions),
                dropout=model.dropout, second_time_embedder=model.second_time_embedder,
                time_scale=model.time_scale)
  if model.name == "imf_dit":
    depth, hidden_size, num_heads, head_depth = imf_dit.SIZES[model.size]
    return dict(name="imf_dit", input_size=data.image_size, patch_size=model.patch_size,
                in_channels=data.channels, hidden_size=hidden_size, depth=depth,
                num_heads=num_heads, head_depth=head_depth, mlp_ratio=model.mlp_ratio,
                num_classes=data.num_classes)
  raise ValueError(f"model.name={model.name!r}: export supports 'dit', 'jit', 'unet' and "
                   "'imf_dit' (the torch twins have no MLP)")


def _abstract_model(config):
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0)))


def pos_embed(config) -> np.ndarray:
  """The fixed [T, D] sin-cos embedding of config's model (torch's `pos_embed`, unbatched)."""
  return _abstract_model(config).pos_embed()


def net_to_torch(config, net_params) -> dict:
  """The torch state_dict of config's network (convert.to_torch, unet_to_torch, imf_dit_to_torch)."""
  if config.model.name == "unet":
    return convert.unet_to_torch(net_params)
  if config.model.name == "imf_dit":
    return convert.imf_dit_to_torch(net_params)
  return convert.to_torch(net_params, pos_embed(config))


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
  decays = config.training.ema_decays
  description = objectives.describe(config)
  meta = dict(
      format=FORMAT,
      model=model_spec(config),
      objective=objective_meta(config, description, params_by_weights),
      sampling=sampling_meta(config, description),
      weights=dict(safetensors=exported, step=step,
                   ema_decay=float(decays[0]) if "ema" in params_by_weights else None),
      files=dict(safetensors=stem + ".safetensors", pt=stem + ".pt"),
      layout="torch NCHW; t in [0, 1] with t = 0 data, t = 1 noise; label num_classes = null",
      config=json.loads(config.to_json()),
  )
  if config.objective.name == "imm" and config.model.name in ("dit", "unet"):
    meta["imm_precond"] = pretrained.imm_precond_kwargs(config)
    meta["files"]["imm_precond"] = stem + "_immprecond.pt"
  return meta


def export_checkpoint(config, workdir: str, step=None) -> dict:
  """Write stepN.{safetensors, pt, json} of the checkpoint in workdir; return their paths."""
  config_lib.validate(config)
  model_spec(config)  # fails before restoring for a model torch_load cannot build
  weights = state.Weights(config, parallel.make_mesh(config.mesh))
  raw, step = weights.restore(workdir, use_ema=False, step=step)
  params_by_weights = {"model": jax.device_get(raw)}
  if config.training.ema_decays:
    params_by_weights["ema"] = jax.device_get(weights.restore(workdir, use_ema=True, step=step)[0])
  exported = "ema" if config.export.use_ema and "ema" in params_by_weights else "model"
  if config.export.use_ema and exported == "model":
    console.info("export: export.use_ema=True but training.ema_decays is empty: exporting the "
                 "raw weights")

  state_dicts = {name: net_to_torch(config, params["net"])
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
  model_spec(config)
  state_dict = pretrained.network_state_dict(state_dict, config.data.num_classes)
  if config.model.name == "unet":
    return convert.unet_from_torch(state_dict, lambda: models.build(config, nnx.Rngs(0)))[1]
  return convert.from_torch(state_dict, state.build_model(config).abstract_net, pos_embed(config),
                            drop_learned_sigma=drop_learned_sigma)


def init_workdir(config, workdir: str, net_params) -> None:
  """Save a step-0 checkpoint in workdir whose network and EMA weights are net_params.

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
  checkpoint.save(mngr, 0, initial, 0, config)
  mngr.wait_until_finished()
  mngr.close()
  console.info("import: wrote the imported weights as step 0 of %s", workdir)

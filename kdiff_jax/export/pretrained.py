"""The field's released checkpoints: lumalabs/imm's IMMPrecond files, as weights and a config.

lumalabs/imm (Zhou, Ermon, Song 2025) releases `imagenet256_ts_a2.pkl`, `imagenet256_s_a1.pkl`
(DiT-XL/2 on SD-VAE latents) and `cifar10.pt` (DDPM++ SongUNet) as pickles of
{'ema': IMMPrecond(...), ...}; `pickles.load` reads them without running their code. An
IMMPrecond holds the network as `model` (so its state_dict keys carry a `model.` prefix) and its
settings as attributes (img_resolution, img_channels, label_dim, noise_schedule, sigma_data,
f_type, T, eps, temb_type, time_scale); the network's class and attributes give its size.

The official DiT's label table: `LabelEmbedder(num_classes + 1, D, class_dropout_prob)` has
num_classes + 1 rows (+1 more when class_dropout_prob > 0). Labels reach it one-hot and an
all-zero vector (IMMPrecond.cfg_forward's unconditional half) picks row num_classes through
`argmax([one_hot, 1 - sum(one_hot)])`; the extra dropout row is reachable only by the
training-time token_drop. Ours has num_classes + 1 rows with the null label num_classes, so the
rows map one to one and the dropout row is left out (import: from a pickle, an IMMPrecond
state_dict or the bare inner DiT's, `network_state_dict`) or absent (export, loads into
IMMPrecond(..., class_dropout_prob=0), the default).

  state_dict, config = pretrained.read('imagenet256_ts_a2.pkl')   # config None for a state_dict
"""
import os
import pickle

import numpy as np

from kdiff_jax import schema
from kdiff_jax.data import latents
from kdiff_jax.export import pickles, released_imf, released_tvm
from kdiff_jax.models import dit, unet

PREFIX = "model."
LABEL_TABLE = "y_embedder.embedding_table.weight"
# IMMPrecond.noise_schedule -> objective.schedule.
SCHEDULES = {"fm": "rectified_flow", "vp_cosine": "cosine"}


def is_imm_precond(state_dict) -> bool:
  return bool(state_dict) and all(key.startswith(PREFIX) for key in state_dict)


def network_state_dict(state_dict, num_classes: int) -> dict:
  """The network's own state_dict from an IMMPrecond one (keys 'model.*', prefix dropped) or a
  bare one, with a DiT label table of num_classes + 2 rows (lumalabs' DiT built with class
  dropout) cut to our num_classes + 1 (module docstring); other tables are left as they are."""
  prefixed = is_imm_precond(state_dict)
  net = {key[len(PREFIX):]: value for key, value in state_dict.items()} if prefixed else dict(state_dict)
  table = net.get(LABEL_TABLE)
  if table is None:
    return net
  if table.shape[0] == num_classes + 2:
    net[LABEL_TABLE] = table[:num_classes + 1]
  elif prefixed and table.shape[0] != num_classes + 1:
    raise ValueError(f"{PREFIX}{LABEL_TABLE} has {table.shape[0]} rows: IMM's DiT has "
                     f"num_classes + 1 (or + 2 with class dropout) = {num_classes + 1} "
                     f"(or {num_classes + 2}) for data.num_classes={num_classes}")
  return net


def to_imm_precond(state_dict) -> dict:
  """The network's state_dict as IMMPrecond's (keys 'model.*')."""
  return {PREFIX + key: value for key, value in state_dict.items()}


def imm_precond_export(config) -> dict | None:
  """IMMPrecond(**kwargs) (lumalabs/imm training/preconds.py, model_type 'DiT' or 'SongUNet')
  whose load_state_dict(strict=True) takes `to_imm_precond` of config's exported network: the
  released format this module reads back, for an IMM-trained DiT or SongUNet; None for every
  other run."""
  if config.objective.name != "imm" or config.model.name not in ("dit", "unet"):
    return None
  schedule = {ours: theirs for theirs, ours in SCHEDULES.items()}.get(config.objective.schedule)
  if schedule is None:
    raise ValueError(f"objective.schedule={config.objective.schedule!r}: IMMPrecond has "
                     f"{sorted(SCHEDULES.values())}")
  data, model, objective = config.data, config.model, config.objective
  precond = dict(img_resolution=data.image_size, img_channels=data.channels,
                 noise_schedule=schedule, sigma_data=objective.noise_std,
                 f_type=objective.imm.f_type, T=objective.t_max, eps=objective.t_min,
                 temb_type=objective.imm.time_conditioning, time_scale=model.time_scale,
                 s_embed=model.second_time_embedder)
  if model.name == "unet":
    model_channels, channel_mult, num_blocks, attn_resolutions = unet.SIZES[model.size]
    return dict(precond, label_dim=data.num_classes if model.class_conditional else 0,
                model_type="SongUNet", model_channels=model_channels,
                channel_mult=list(channel_mult), num_blocks=num_blocks,
                attn_resolutions=list(attn_resolutions), dropout=model.dropout,
                embedding_type="positional", encoder_type="standard", decoder_type="standard",
                channel_mult_noise=1, resample_filter=list(unet.RESAMPLE_FILTER))
  depth, hidden_size, num_heads = dit.SIZES[model.size]
  return dict(precond, label_dim=data.num_classes, model_type="DiT", patch_size=model.patch_size,
              hidden_size=hidden_size, depth=depth, num_heads=num_heads,
              mlp_ratio=model.mlp_ratio, num_classes=data.num_classes)


def _dit_size(depth: int, hidden_size: int, num_heads: int) -> str:
  for size, shape in dit.SIZES.items():
    if shape == (depth, hidden_size, num_heads):
      return size
  raise ValueError(f"the pickled DiT has depth {depth}, width {hidden_size} and {num_heads} "
                   f"heads: no kdiff_jax DiT size matches (model.size: {dit.SIZES})")


def _set_dit(config, net: pickles.Pickled, tensors: dict) -> None:
  blocks = pickles.submodule(net, "blocks").state["_modules"]
  patch_weight = tensors[PREFIX + "x_embedder.proj.weight"]
  hidden_size, _, patch_size, _ = patch_weight.shape
  num_heads = pickles.attribute(net, "num_heads")
  if num_heads is None:
    raise ValueError(f"the pickled {net.qualname} has no num_heads attribute")
  config.model.name = "dit"
  config.model.size = _dit_size(len(blocks), int(hidden_size), int(num_heads))
  config.model.patch_size = int(patch_size)
  config.model.second_time_embedder = any(key.startswith(PREFIX + "s_embedder.")
                                          for key in tensors)


def _unet_size(tensors: dict) -> str:
  """The unet.SIZES entry of a SongUNet state_dict, read from its layer names and shapes."""
  enc = {key.split(".")[2] for key in tensors if key.startswith(PREFIX + "enc.")}
  resolutions = sorted({int(name.split("x")[0]) for name in enc}, reverse=True)
  top = resolutions[0]
  model_channels = tensors[f"{PREFIX}enc.{top}x{top}_conv.weight"].shape[0]
  channel_mult = tuple(tensors[f"{PREFIX}enc.{r}x{r}_block0.conv1.weight"].shape[0]
                       // model_channels for r in resolutions)
  num_blocks = sum(name.startswith(f"{top}x{top}_block") for name in enc)
  attention = tuple(r for r in resolutions
                    if f"{PREFIX}enc.{r}x{r}_block0.qkv.weight" in tensors)
  shape = (model_channels, channel_mult, num_blocks, attention)
  for size, known in unet.SIZES.items():
    if known == shape:
      return size
  raise ValueError(f"the pickled SongUNet has (model_channels, channel_mult, num_blocks, "
                   f"attn_resolutions) = {shape}: no kdiff_jax U-Net size matches ({unet.SIZES})")


def config_from_imm_precond(precond: pickles.Pickled, tensors: dict):
  """The kdiff_jax config of a pickled IMMPrecond: network, IMM settings, data shapes (data.name
  'synthetic': the file names no dataset; fine-tuning imports with the experiment's --config
  instead), and the sampling of lumalabs/imm's configs/*_generate_images.yaml (ImageNet: pushforward on
  linspace(T, eps, N + 1), N = 8, guidance 1.5; CIFAR-10: pushforward on [T, eta^-1(1.4), eps])."""
  get = lambda name: pickles.attribute(precond, name)
  noise_schedule = get("noise_schedule")
  if noise_schedule not in SCHEDULES:
    raise ValueError(f"IMMPrecond.noise_schedule={noise_schedule!r}: kdiff_jax has "
                     f"{sorted(SCHEDULES)}")
  config = schema.defaults()
  num_classes = int(get("label_dim") or 0)
  config.data.image_size = int(get("img_resolution"))
  config.data.channels = int(get("img_channels"))
  config.data.num_classes = num_classes
  config.data.name = "synthetic"  # shapes only: to fine-tune, import with the experiment's --config
  if config.data.channels == 4:
    config.data.update(latents.IMM_IMAGENET_STATS)

  net = pickles.submodule(precond, "model")
  if "x_embedder" in net.state["_modules"]:
    _set_dit(config, net, tensors)
  elif "enc" in net.state["_modules"]:
    config.model.name, config.model.size, config.model.patch_size = "unet", _unet_size(tensors), 1
    config.model.second_time_embedder = PREFIX + "map_layer0_s.weight" in tensors
    config.model.dropout = float(pickles.attribute(
        pickles.submodule(pickles.submodule(net, "enc"), f"{config.data.image_size}x"
                          f"{config.data.image_size}_block0"), "dropout", 0.0))
  else:
    raise ValueError(f"IMMPrecond.model is a {net.qualname}: kdiff_jax imports DiTs and "
                     "SongUNets")
  config.model.time_scale = float(get("time_scale"))

  objective = config.objective
  objective.name = "imm"
  objective.schedule = SCHEDULES[noise_schedule]
  objective.noise_std = float(get("sigma_data"))
  objective.t_min, objective.t_max = float(get("eps")), float(get("T"))
  objective.imm.f_type = str(get("f_type"))
  objective.imm.time_conditioning = str(get("temb_type"))

  sampling = config.sampling
  sampling.method = "pushforward"
  sampling.t_start, sampling.t_end = objective.t_max, objective.t_min
  if num_classes:
    sampling.grid, sampling.num_steps, sampling.guidance_scale = "uniform_t", 8, 1.5
  else:
    sampling.grid, sampling.num_steps, sampling.guidance_scale = "cifar", 2, 1.0
  config.training.ema_decays = (0.9999,)
  return config


def describe(config) -> str:
  """One line on what an imported config holds, for the console."""
  if config.objective.name == "tvm":
    return released_tvm.describe(config)
  if config.objective.name == "imf":
    return released_imf.describe(config)
  model, objective, sampling = config.model, config.objective, config.sampling
  return (f"IMM {model.name} {model.size}/{model.patch_size} on {config.data.image_size}x"
          f"{config.data.image_size}x{config.data.channels}, {config.data.num_classes} classes, "
          f"{objective.imm.f_type} map, {objective.imm.time_conditioning} time conditioning, "
          f"[eps, T] = [{objective.t_min}, {objective.t_max}]; sampling {sampling.method} "
          f"{sampling.num_steps} steps, guidance {sampling.guidance_scale}")


def read(path: str):
  """(IMMPrecond-free state_dict of the network, config or None) of a released file.

  A pickled {'ema': IMMPrecond} (or a bare pickled IMMPrecond) gives its EMA network's tensors
  and the config built from it; lumalabs/tvm's {'ema' or 'net': TVMWrapper} likewise
  (released_tvm.py); a state_dict (torch file, safetensors, npz; IMMPrecond keys
  or the network's) gives its tensors and None: pass --config. An iMF flax checkpoint (a
  directory or a `checkpoint_<step>` file) gives released_imf.read's.
  """
  from kdiff_jax.export import weight_files
  if released_imf.is_flax_checkpoint(path):
    return released_imf.read(path)
  tree = None
  if path.endswith((".pkl", ".pt", ".pth")):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--import_from={path}: no such file")
    try:
      tree = pickles.load(path)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as error:
      raise ValueError(f"--import_from={path} is not a readable pickle or torch file: "
                       f"{error}") from error
  if released_tvm.wrapper_of(tree) is not None:
    return released_tvm.read(tree, path)
  precond = tree.get("ema", tree) if isinstance(tree, dict) else tree
  if isinstance(precond, pickles.Pickled) and "model" in precond.state.get("_modules", {}):
    tensors = {key: np.asarray(value, np.float32)
               for key, value in pickles.module_tensors(precond).items()}
    config = config_from_imm_precond(precond, tensors)
    return network_state_dict(tensors, config.data.num_classes), config
  state_dict = weight_files.read_state_dict(path)
  return state_dict, None

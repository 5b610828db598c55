"""Lyy-iiis/imeanflow's released iMF checkpoints (`iMF-{B,M,L,XL}-2.zip`, "inference" and
"full"), read without the authors' Linen classes, as the torch twin's state_dict and a config.

The files (utils/ckpt_util.py, utils/trainstate_util.py of the official JAX code) are
`flax.training.checkpoints` saves of a Linen TrainState with fields step, params, opt_state and
ema_params, params = {'net': imfDiT}: with orbax installed an orbax (OCDBT) directory
`checkpoint_<step>/` (_METADATA, manifest.ocdbt, ocdbt.process_0/...), else flax's legacy single
msgpack file `checkpoint_<step>`. Either is read as raw NumPy: orbax's PyTreeCheckpointer
restores only step, params and ema_params (no target, no Adam moments), msgpack by
flax.serialization.msgpack_restore. "full" files hold all four fields and the v head; the
"inference" ones hold at least ema_params (their eval model, `imfDiT(eval=True)`, has no
`v_heads_i` blocks; it keeps v_final_layer). We import ema_params, which the authors evaluate
(utils/sample_util.py samples state.ema_params); the raw params and opt_state are not imported.

Names (models/imfDiT.py, models/embedder.py, models/torch_models.py) and their torch twin keys
(export/torch_imf_dit.py, whose names are the official modules'):

  TorchLinear  <m>/_flax_linear/{kernel [in, out], bias}  -> <m>.weight [out, in], <m>.bias
  TorchEmbedding <m>/_flax_embedding/embedding            -> <m>.weight (num_classes + 1 rows)
  RMSNorm      <m>/kernel [dim]                           -> <m>.weight
  nn.Sequential embedder MLP  mlp/layers_0, mlp/layers_2  -> mlp.0, mlp.2
  block lists  shared_blocks_i, u_heads_i, v_heads_i      -> shared_blocks.i, u_heads.i, v_heads.i
  patch conv   x_embedder/proj/kernel [p, p, C, D] (HWIO) -> x_embedder.proj.weight [D, C, p, p]
  class_tokens, omega_tokens, t_min_tokens, t_max_tokens, time_tokens, attn_scale, mlp_scale
                                                          -> the same names

The size comes from the shapes (width, blocks, head width: q_norm's dim); RoPE and the input
size are not stored (official input_size 32: SD-VAE latents of ImageNet 256). A file without v
head blocks is completed with v heads copied from the u head (blocks and final layer), so that
sampling (u head only) is the file's and `--mode=train` starts its v head at v(z, h) = u(z, h):
the v head at h = 0 (the JVP tangent of iMF's loss) is then the u head's instantaneous velocity.

The config carries the official settings: the network, the recipe of configs/default.py and
train_config.yml for fine-tuning, the latents' normalisation of utils/vae_util.py (per-channel
mean / std, no further scale) and the 1-NFE sampling of configs/eval_config.yml per size
(`SAMPLING`).
"""
import os
import re

import numpy as np

from kdiff_jax import console, schema
from kdiff_jax.data import latents
from kdiff_jax.models import imf_dit

FIELDS = ("step", "params", "opt_state", "ema_params")
READ_FIELDS = ("step", "params", "ema_params")
# The official imfDiT's input_size (configs/default.py dataset.image_size): not in the file.
IMAGE_SIZE = 32
# size -> (ω, (t_min, t_max)) at 1 NFE (configs/eval_config.yml); XL/2 at 2 NFE: XL_TWO_STEPS.
# The tiny test sizes T and XS take B's.
SAMPLING = {"B": (8.0, (0.4, 0.65)), "M": (10.5, (0.4, 0.6)), "L": (10.5, (0.4, 0.6)),
            "XL": (8.0, (0.42, 0.62))}
XL_TWO_STEPS = (4.0, (0.36, 0.64))
ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA")
_STACK = re.compile(r"(shared_blocks|u_heads|v_heads)_(\d+)")
_SEQUENTIAL = re.compile(r"layers_(\d+)")
_WRAPPERS = ("_flax_linear", "_flax_embedding")


def is_flax_checkpoint(path: str) -> bool:
  """A directory, or a file named like flax's `checkpoint_<step>` (or *.msgpack)."""
  name = os.path.basename(os.path.normpath(path))
  return os.path.isdir(path) or name.startswith("checkpoint_") or name.endswith(".msgpack")


def _step_of(name: str):
  match = re.fullmatch(r"checkpoint_(\d+)", name)
  return int(match.group(1)) if match else None


def checkpoint_path(path: str) -> str:
  """The checkpoint itself: `path` when it is one (an orbax directory or a msgpack file), else
  the newest `checkpoint_<step>` inside it (what flax's restore_checkpoint picks)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"--import_from={path}: no such file or directory")
  if os.path.isfile(path) or any(os.path.exists(os.path.join(path, marker))
                                 for marker in ORBAX_MARKERS):
    return path
  steps = {_step_of(name): name for name in os.listdir(path) if _step_of(name) is not None}
  if not steps:
    raise ValueError(f"--import_from={path} is a directory without a flax checkpoint: expected "
                     "an orbax checkpoint_<step>/ (with _METADATA) or one holding "
                     "checkpoint_<step> entries")
  return os.path.join(path, steps[max(steps)])


def _refuse_fields(path: str, fields) -> None:
  fields = sorted(fields)
  if "ema_params" not in fields or not set(fields) <= set(FIELDS):
    raise ValueError(f"--import_from={path}: a flax checkpoint with fields {fields}; iMF's "
                     f"TrainState checkpoints hold ema_params and step ('inference'), or "
                     f"{list(FIELDS)} ('full')")


def load_tree(path: str):
  """(the checkpoint's step, params and ema_params as nested dicts of NumPy arrays (those it
  has), every field name it holds) of an orbax directory or a legacy msgpack file."""
  if os.path.isdir(path):
    import orbax.checkpoint as ocp
    import jax
    checkpointer = ocp.PyTreeCheckpointer()
    stored = checkpointer.metadata(os.path.abspath(path)).item_metadata.tree
    fields = list(stored)
    _refuse_fields(path, fields)
    wanted = {name: stored[name] for name in READ_FIELDS if name in stored}
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    tree = checkpointer.restore(os.path.abspath(path), args=ocp.args.PyTreeRestore(
        item=wanted, restore_args=as_numpy, partial_restore=True))
    return tree, fields
  from flax import serialization
  with open(path, "rb") as f:
    data = f.read()
  try:
    tree = serialization.msgpack_restore(data)
  except Exception as error:   # msgpack's own exception types vary by version
    raise ValueError(f"--import_from={path} is not a flax msgpack checkpoint: {error}") from error
  if not isinstance(tree, dict):
    raise ValueError(f"--import_from={path}: a msgpack of a {type(tree).__name__}, not a flax "
                     "TrainState checkpoint")
  _refuse_fields(path, tree)
  return tree, list(tree)


def _torch_key(path) -> tuple[str, tuple | None]:
  """(torch twin key, transpose or None) of an official parameter path (module docstring)."""
  parts = []
  for name in path[:-1]:
    if name in _WRAPPERS:
      continue
    stack, sequential = _STACK.fullmatch(name), _SEQUENTIAL.fullmatch(name)
    parts += ([stack.group(1), stack.group(2)] if stack else
              [sequential.group(1)] if sequential else [name])
  leaf, transpose = path[-1], None
  if leaf == "kernel":
    leaf, transpose = "weight", {1: None, 2: (1, 0), 4: (3, 2, 0, 1)}
  elif leaf == "embedding":
    leaf = "weight"
  return ".".join(parts + [leaf]), transpose


def torch_state_dict(net) -> dict[str, np.ndarray]:
  """The torch twin's state_dict (float32, torch layouts) of an official imfDiT param tree."""
  from flax import traverse_util
  state = {}
  for path, value in traverse_util.flatten_dict(net).items():
    key, transposes = _torch_key(path)
    value = np.asarray(value, np.float32)
    order = transposes and transposes.get(value.ndim)
    state[key] = np.array(value.transpose(order) if order else value, order="C")  # writable
  return state


def _count(state: dict, stack: str) -> int:
  return len({key.split(".")[1] for key in state if key.startswith(stack + ".")})


def network_shape(state: dict, path: str) -> dict:
  """The network's sizes read from its shapes, with model.size; a ValueError names what was
  found where it is no imfDiT or no imf_dit size."""
  required = ("x_embedder.proj.weight", "y_embedder.embedding_table.weight",
              "shared_blocks.0.attn.q_norm.weight", "u_heads.0.mlp.w1.weight",
              "u_final_layer.linear.weight")
  if any(key not in state for key in required):
    found = sorted({key.split(".")[0] for key in state})
    raise ValueError(f"--import_from={path}: ema_params['net'] holds {found}; an iMF imfDiT "
                     "has x_embedder, y_embedder, shared_blocks_i, u_heads_i, u_final_layer, ...")
  hidden, channels, patch, _ = state["x_embedder.proj.weight"].shape
  shared, head = _count(state, "shared_blocks"), _count(state, "u_heads")
  num_heads = hidden // state["shared_blocks.0.attn.q_norm.weight"].shape[0]
  shape = (shared + head, int(hidden), int(num_heads), head)
  sizes = [size for size, known in imf_dit.SIZES.items() if known == shape]
  if not sizes:
    raise ValueError(f"--import_from={path}: an imfDiT of {shared} shared + {head} head blocks, "
                     f"width {hidden}, {num_heads} heads (depth, width, heads, head depth = "
                     f"{shape}): no imf_dit size matches ({imf_dit.SIZES})")
  mlp_hidden = state["u_heads.0.mlp.w1.weight"].shape[0]
  if mlp_hidden != int(int(hidden * 4.0) * 2 / 3):
    raise ValueError(f"--import_from={path}: SwiGLU width {mlp_hidden}; iMF's is int(8/3 * "
                     f"{hidden}) = {int(int(hidden * 4.0) * 2 / 3)}")
  tokens = {name: state[name].shape[0] for name, _ in imf_dit.TOKEN_GROUPS if name in state}
  if tokens != dict(imf_dit.TOKEN_GROUPS):
    raise ValueError(f"--import_from={path}: condition tokens {tokens}; iMF's are "
                     f"{dict(imf_dit.TOKEN_GROUPS)}")
  return dict(size=sizes[0], patch_size=int(patch), channels=int(channels), head_depth=head,
              num_classes=int(state["y_embedder.embedding_table.weight"].shape[0]) - 1,
              v_head=_count(state, "v_heads") == head)


def with_v_head_from_u(state: dict) -> dict:
  """state with v_heads.i.* and v_final_layer.* copies of u_heads.i.* and u_final_layer.*."""
  state = {key: value for key, value in state.items()
           if not key.startswith(("v_heads.", "v_final_layer."))}
  for key in list(state):
    if key.startswith(("u_heads.", "u_final_layer.")):
      state["v" + key[1:]] = state[key].copy()
  return state


def config_for(shape: dict):
  """The kdiff_jax config of an iMF release (module docstring): data shapes and normalisation
  (data.name 'synthetic': the file names no dataset; fine-tuning overrides data.*), the network,
  iMF's objective and optimizer (configs/default.py, train_config.yml) and the 1-NFE sampling
  of eval_config.yml. ω = 10.5 (M/2, L/2) lies above the training range [1, 1 + 7]: there
  objective.imf.s_max is 9.5, so that fine-tuning draws ω up to the sampled one."""
  config = schema.defaults()
  data, model, objective = config.data, config.model, config.objective
  data.name, data.image_size, data.channels = "synthetic", IMAGE_SIZE, shape["channels"]
  data.num_classes = shape["num_classes"]
  data.update(latents.IMM_IMAGENET_STATS)
  data.latent_scale = 1.0

  model.name, model.size, model.patch_size = "imf_dit", shape["size"], shape["patch_size"]
  model.second_time_embedder, model.time_scale = True, 1.0

  objective.name, objective.schedule = "imf", "rectified_flow"
  objective.time_sampling = "logit_normal"
  objective.logit_normal_mean, objective.logit_normal_std = -0.4, 1.0
  objective.label_dropout = 0.1
  guidance, interval = SAMPLING.get(shape["size"], SAMPLING["B"])
  objective.imf.s_max = max(7.0, guidance - 1.0)

  config.optimizer.learning_rate, config.optimizer.b2 = 1e-4, 0.95
  config.training.batch_size, config.training.ema_decays = 1024, (0.9999,)

  sampling = config.sampling
  sampling.method, sampling.grid, sampling.num_steps = "mean_flow", "uniform_t", 1
  sampling.guidance_scale, sampling.guidance_interval = guidance, interval
  return config


def describe(config) -> str:
  """One line on an imported iMF config, for the console."""
  data, sampling = config.data, config.sampling
  return (f"iMF-{config.model.size}/{config.model.patch_size} on {data.image_size}x"
          f"{data.image_size}x{data.channels} latents, {data.num_classes} classes; sampling "
          f"{sampling.num_steps} step(s), omega {sampling.guidance_scale}, interval "
          f"{tuple(sampling.guidance_interval)}; --mode=train fine-tunes these weights with a "
          f"fresh optimizer state (the file's opt_state is not imported)")


def read(path: str):
  """(the torch twin's state_dict of the file's EMA network, its config) of an iMF checkpoint
  (a checkpoint_<step> directory or msgpack file, or a directory holding them)."""
  source = checkpoint_path(path)
  tree, fields = load_tree(source)
  ema = tree["ema_params"]
  if not isinstance(ema, dict) or "net" not in ema:
    found = sorted(ema) if isinstance(ema, dict) else type(ema).__name__
    raise ValueError(f"--import_from={path}: ema_params holds {found}; iMF's hold "
                     "{'net': imfDiT params}")
  state = torch_state_dict(ema["net"])
  shape = network_shape(state, path)
  layout = "full" if shape["v_head"] else "inference"
  console.info("import: %s: an iMF checkpoint (%s layout: fields %s, step %s): importing "
               "ema_params, the weights the authors evaluate", source, layout, sorted(fields),
               int(np.asarray(tree.get("step", -1))))
  if not shape["v_head"]:
    console.info("import: no v_heads_i blocks (an inference checkpoint): v_heads and "
                 "v_final_layer start as copies of u_heads and u_final_layer (sampling reads "
                 "only the u head; fine-tuning starts the v head at v = u)")
    state = with_v_head_from_u(state)
  return state, config_for(shape)

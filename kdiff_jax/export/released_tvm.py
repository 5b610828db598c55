"""lumalabs/tvm's released pickles (Terminal Velocity Matching), as weights and a config.

The files (`im256_w2.pkl`, `im256_w1p75.pkl`, `im512_w2p5.pkl`) are EDM persistence pickles, the
family of IMM's, read by `pickles.load` without running anything they name. The network sits under
'ema' (what `generate_images.py` reads) or 'net' (the training loop's snapshot, an EMA too),
possibly inside `torch.compile`'s wrapper (`torch._dynamo.eval_frame.OptimizedModule`, whose first
constructor argument is the module): a `TVMWrapper` holding the `DiT` as `model` (state_dict keys
'model.*') and `do_scale_param`. The DiT's class name (e.g. DiT_XL_2_18h) is not read: sizes come
from the tensors (depth = blocks, width and patch from x_embedder.proj, classes from the label
table's num_classes + 1 rows, MLP ratio from fc1) and the heads from `num_heads` or the q_norm
length (the head dim). Its options: qk_norm (q_norm weights present), do_mod_norm (the blocks'
attribute), learn_guidance (guidance_embedder present: required), width of the conditioning =
hidden size (temb_mult 1, required), RMSNorm without affine, init_type and time_specinit (the
DiT's attributes: the yamls' model_kwargs reach the DiT as one nested argument that it ignores,
so every released network was built with the DiT's defaults, time_specinit False).

What the network computes (lumalabs/tvm `training/dit.py`, `training/wrapper.py`) is our DiT with
TVM's options and time_scale 1: F(x, t, h = t - s, y, beta) with raw t, h and beta = 1/cfg in the
three embedders; f_{s,t}(x) = x + (s - t)·a·F, a = cfg with do_scale_param (the im256 files), 1
without (im512_w2p5). The guidance scale is not in the network: it comes from the README's table
by file name (`RELEASES`: cfg and the NFE its FID is reported at), or else from the training
config that rides along in the pickle (omegaconf `DictConfig`s reach the wrapper as arguments and
keep their parent links: `loss.cfg`); a file with neither is refused.

  state_dict, config = released_tvm.read(tree, path)   # tree = pickles.load(path)
"""
import dataclasses
import os

import numpy as np

from kdiff_jax import schema
from kdiff_jax.data import latents
from kdiff_jax.export import pickles
from kdiff_jax.models import dit

PREFIX = "model."
KEYS = ("ema", "net")
FREQUENCY_EMBEDDING_SIZE = 256


@dataclasses.dataclass(frozen=True)
class Release:
  """A file of lumalabs/tvm's README: its cfg, the NFE and FID reported, do_scale_param."""
  cfg: float
  num_steps: int
  fid: float
  scale_output: bool


RELEASES = {
    "im256_w2": Release(cfg=2.0, num_steps=1, fid=3.29, scale_output=True),
    "im256_w1p75": Release(cfg=1.75, num_steps=4, fid=1.99, scale_output=True),
    "im512_w2p5": Release(cfg=2.5, num_steps=1, fid=4.32, scale_output=False),
}
# Latent normalisation by latent size (the yaml encoders: 256 -> 32x32, 512 -> 64x64), final_std 1.
LATENT_STATS = {32: dict(latents.IMM_IMAGENET_STATS, latent_scale=1.0),
                64: latents.TVM_IMAGENET512_STATS}


def _unwrap(value):
  """The module under torch.compile's OptimizedModule (its `_orig_mod`), else value itself."""
  if isinstance(value, pickles.Pickled) and value.qualname.endswith(".OptimizedModule"):
    if value.args:
      return value.args[0]
    return pickles.submodule(value, "_orig_mod")
  return value


def wrapper_of(tree):
  """The pickled TVMWrapper under tree['ema'] or tree['net'], or None."""
  if not isinstance(tree, dict):
    return None
  for key in KEYS:
    value = _unwrap(tree.get(key))
    if isinstance(value, pickles.Pickled) and value.qualname.split(".")[-1] == "TVMWrapper":
      return value
  return None


def _plain(value, depth=0):
  """An omegaconf DictConfig / ListConfig / AnyNode record as plain dicts, lists and values (no
  parents; an interpolation or a missing value stays the string omegaconf stored)."""
  state = value.state if isinstance(value, pickles.Pickled) else None
  if isinstance(state, dict) and "_content" in state and depth < 32:
    content = state["_content"]
    if isinstance(content, dict):
      return {key: _plain(node, depth + 1) for key, node in content.items()}
    if isinstance(content, (list, tuple)):
      return [_plain(node, depth + 1) for node in content]
    return content
  if isinstance(state, dict) and "_val" in state:
    return state["_val"]
  return value


def carried_config(wrapper) -> dict:
  """The training config that rides along (the root of any DictConfig among the wrapper's
  attributes, through `_parent`), as plain dicts; {} if none."""
  for value in dict(pickles.attribute(wrapper, "model_kwargs") or {}).values():
    node, hops = value, 0
    while isinstance(node, pickles.Pickled) and isinstance(node.state, dict) and (
        "_content" in node.state):
      parent = node.state.get("_parent")
      if parent is None or hops > 32:
        return _plain(node)
      node, hops = parent, hops + 1
  return {}


def _refuse(path, found: str, expected: str):
  raise ValueError(f"--import_from={path}: {found}; expected {expected}")


def _network_settings(path, net, tensors: dict) -> dict:
  """Sizes and options of the pickled DiT from its tensors and attributes (module docstring)."""
  modules = net.state.get("_modules", {}) if isinstance(net.state, dict) else {}
  needed = ("x_embedder", "t_embedder", "s_embedder", "guidance_embedder", "y_embedder",
            "blocks", "final_layer")
  missing = [name for name in needed if modules.get(name) is None]
  if missing:
    _refuse(path, f"the TVMWrapper's {net.qualname} has no {', '.join(missing)}",
            "lumalabs/tvm's DiT with learn_guidance (t, s and guidance embedders, label table, "
            "blocks, final layer)")
  hidden, channels, patch, _ = tensors["x_embedder.proj.weight"].shape
  depth = len(pickles.submodule(net, "blocks").state["_modules"])
  embed = tensors["t_embedder.mlp.0.weight"].shape
  if embed != (hidden, FREQUENCY_EMBEDDING_SIZE):
    _refuse(path, f"t_embedder.mlp.0.weight is {embed}",
            f"({hidden}, {FREQUENCY_EMBEDDING_SIZE}): a conditioning as wide as the network "
            "(temb_mult 1) from 256 frequencies")
  head_dim = (tensors["blocks.0.attn.q_norm.weight"].shape[0]
              if "blocks.0.attn.q_norm.weight" in tensors else None)
  num_heads = pickles.attribute(net, "num_heads")
  num_heads = int(num_heads) if num_heads is not None else (
      hidden // head_dim if head_dim else None)
  if num_heads is None or hidden % num_heads or (head_dim and hidden // num_heads != head_dim):
    _refuse(path, f"width {hidden} with num_heads {num_heads} and q_norm length {head_dim}",
            "num_heads dividing the width into heads of the q_norm length")
  sizes = {shape[:2]: name for name, shape in dit.SIZES.items()}
  if (depth, hidden) not in sizes:
    _refuse(path, f"a DiT of depth {depth} and width {hidden}",
            f"one of kdiff_jax's DiT sizes (depth, width): {sorted(sizes)}")
  rows = tensors["y_embedder.embedding_table.weight"].shape[0]
  tokens = tensors["pos_embed"].shape[1]
  grid = int(round(np.sqrt(tokens)))
  if grid * grid != tokens:
    _refuse(path, f"pos_embed of {tokens} tokens", "a square grid of patches")
  block = pickles.submodule(pickles.submodule(net, "blocks"), "0")
  init = "xavier_uniform" if pickles.attribute(net, "init_type", "spectral") != "spectral" else (
      "spectral" if pickles.attribute(net, "time_specinit", False) else
      "spectral_except_embedders")
  return dict(init=init, size=sizes[depth, hidden], num_heads=num_heads, patch_size=int(patch),
              channels=int(channels), image_size=grid * int(patch), num_classes=int(rows) - 1,
              mlp_ratio=tensors["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
              qk_norm=head_dim is not None,
              modulation_norm=bool(pickles.attribute(block, "do_mod_norm", True)))


def _sampling_settings(path, wrapper, scale_output: bool) -> Release:
  """The README's cfg and NFE for a released file's name, else the carried loss.cfg at 1 step."""
  stem = os.path.splitext(os.path.basename(path))[0]
  release = RELEASES.get(stem)
  if release is not None:
    if release.scale_output != scale_output:
      _refuse(path, f"do_scale_param={scale_output} in a file named {stem}",
              f"do_scale_param={release.scale_output}, as lumalabs/tvm released it")
    return release
  cfg = (carried_config(wrapper).get("loss") or {}).get("cfg")
  if cfg is None:
    _refuse(path, f"a TVM pickle named {stem!r} without a training config (loss.cfg) in it",
            f"one of lumalabs/tvm's files {sorted(RELEASES)} (their cfg is in the README), or "
            "a snapshot that carries its config")
  return Release(cfg=float(cfg), num_steps=1, fid=float("nan"), scale_output=scale_output)


def read(tree, path: str):
  """(the DiT's state_dict without 'model.', the kdiff_jax config) of a pickled TVM file."""
  wrapper = wrapper_of(tree)
  net = pickles.submodule(wrapper, "model")
  tensors = {key[len(PREFIX):]: np.asarray(value, np.float32)
             for key, value in pickles.module_tensors(wrapper).items()
             if key.startswith(PREFIX)}
  found = _network_settings(path, net, tensors)
  scale_output = bool(pickles.attribute(wrapper, "do_scale_param", False))
  release = _sampling_settings(path, wrapper, scale_output)

  config = schema.defaults()
  data = config.data
  data.name = "synthetic"   # shapes only: to fine-tune, import with the experiment's --config
  data.image_size, data.channels = found["image_size"], found["channels"]
  data.num_classes = found["num_classes"]
  if data.channels == 4 and data.image_size in LATENT_STATS:
    data.update(LATENT_STATS[data.image_size])

  model = config.model
  model.name, model.size, model.patch_size = "dit", found["size"], found["patch_size"]
  model.num_heads, model.mlp_ratio = found["num_heads"], found["mlp_ratio"]
  model.second_time_embedder = model.guidance_embedder = True
  model.norm, model.qk_norm = "rms_norm", found["qk_norm"]
  model.modulation_norm = found["modulation_norm"]
  model.init, model.time_scale = found["init"], 1.0

  objective = config.objective
  objective.name, objective.schedule, objective.noise_std = "tvm", "rectified_flow", 1.0
  objective.label_dropout = 0.1
  objective.tvm.cfg_draw, objective.tvm.cfg = "fixed", release.cfg
  objective.tvm.scale_output = scale_output

  config.optimizer.update(learning_rate=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
                          grad_clip_norm=1.0 if data.image_size == 64 else 0.0)  # 512 yamls clip
  config.training.ema_decays = (0.9999,)

  sampling = config.sampling
  sampling.method, sampling.grid, sampling.t_start, sampling.t_end = "tvm", "uniform_t", 1.0, 0.0
  sampling.num_steps, sampling.guidance_scale = release.num_steps, release.cfg
  return tensors, config


# The fields that fix what the imported weights compute: an experiment's --config must agree.
NETWORK_FIELDS = ("data.image_size", "data.channels", "data.num_classes", "model.name",
                  "model.size", "model.patch_size", "model.num_heads", "model.mlp_ratio",
                  "model.second_time_embedder", "model.guidance_embedder", "model.norm",
                  "model.qk_norm", "model.modulation_norm", "model.time_scale", "objective.name",
                  "objective.schedule", "objective.tvm.scale_output")


def check_config(carried, config) -> None:
  """Refuse an experiment's config (--config with --import_from) that disagrees with a TVM
  file's network on a NETWORK_FIELDS field; nothing for other files."""
  if carried.objective.name != "tvm":
    return
  theirs, ours = schema.flatten(carried), schema.flatten(config)
  for flat in (theirs, ours):   # 0 heads: the size's own
    flat["model.num_heads"] = flat["model.num_heads"] or dit.SIZES.get(flat["model.size"],
                                                                       (0, 0, 0))[2]
  differ = [f"{field}={ours[field]!r} (the file: {theirs[field]!r})" for field in NETWORK_FIELDS
            if ours[field] != theirs[field]]
  if differ:
    raise ValueError("--config does not describe the imported TVM network: " + "; ".join(differ))


def describe(config) -> str:
  """One line on what an imported TVM config holds, for the console."""
  model, tvm, sampling = config.model, config.objective.tvm, config.sampling
  heads = model.num_heads or dit.SIZES[model.size][2]
  return (f"TVM dit {model.size}/{model.patch_size} ({heads} heads) on "
          f"{config.data.image_size}x{config.data.image_size}x{config.data.channels}, "
          f"{config.data.num_classes} classes, velocity {'cfg·F' if tvm.scale_output else 'F'}; "
          f"sampling tvm {sampling.num_steps} step(s), cfg {sampling.guidance_scale}")

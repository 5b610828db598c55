"""Flax <-> PyTorch state_dicts, in NumPy (no torch import here): the one home of every network's
torch names and layouts.

Our networks keep the attribute names of their torch originals (facebookresearch/DiT `models.py`,
LTH14/JiT `model_jit.py`, NVlabs/edm's SongUNet, the official iMF DiT, diffusers' AutoencoderKL,
torchvision's Inception3), so a parameter's torch key is `torch_name(path)` and its value a
transpose:

  Linear kernel [in, out]            -> weight [out, in]              kernel.T
  Conv kernel [kh, kw, C_in, C_out]  -> weight [C_out, C_in, kh, kw]  kernel.transpose(3, 2, 0, 1)
  bias, Embed table, norm scale, a module's own parameter             as is

Per network: DiT / JiT (`to_torch`, `from_torch`): torch's state_dict also holds the fixed
sin-cos `pos_embed` [1, T, D] (DiT and JiT keep it as a frozen nn.Parameter; here it is the
model's numpy constant `model.pos_embed()` [T, D]). SongUNet (`unet_to_torch`, `unet_from_torch`):
EDM's persistent `resample_filter` buffers. iMF's DiT (`imf_dit_to_torch`,
`imf_dit_from_torch`): the condition tokens, attn_scale and mlp_scale keep their names; pMF's DiT
is exported by the same function (its pos_embed and, for prediction 'u_k', w_k are the model's
own parameters and keep their names). Any network from a torch state_dict by its names: `load`.
A model with scan_blocks holds its blocks stacked (blocks/attn/qkv/kernel of shape [depth, ...]);
`per_block` and `stacked` convert to and from the per-block layout (blocks/3/attn/qkv/kernel)
that torch names, so both layouts give the same state_dict.
Every direction is exact (transposes only): Flax -> torch -> Flax gives the same bits.
`BACKBONES` holds each network's torch side by `model.name` (`model_spec`, `net_to_torch`,
`net_from_torch`): the one place that names the networks for export.
"""
import dataclasses
import types
from typing import Callable, Iterable

import jax
import numpy as np
from flax import nnx, traverse_util

from kdiff_jax.models import dit, imf_dit, jit, pmf_dit, unet

POS_EMBED = "pos_embed"
FINAL_LINEAR = ("final_layer.linear.weight", "final_layer.linear.bias")
# nnx leaf name -> torch parameter / buffer name.
TORCH_LEAF = {"kernel": "weight", "bias": "bias", "embedding": "weight", "scale": "weight",
              "mean": "running_mean", "var": "running_var"}
# iMF's DiT: the parameters a module holds itself (torch keeps their names).
IMF_DIT_OWN = {"attn_scale", "mlp_scale"} | {name for name, _ in imf_dit.TOKEN_GROUPS}


def torch_name(path, own=()) -> str:
  """Flattened nnx param path -> torch state_dict key.

  The rule: join the path with '.', except that the leaf is renamed kernel -> weight, bias -> bias,
  an nnx.Embed's 'embedding' -> 'weight', a norm's 'scale' -> 'weight', a BatchNorm's
  'mean' / 'var' -> 'running_mean' / 'running_var' (replacing it); a parameter held directly by
  the model (JiT's 'in_context_posemb') or named in `own` keeps its name. Examples:
  ('blocks', 3, 'attn', 'qkv', 'kernel') -> 'blocks.3.attn.qkv.weight';
  ('y_embedder', 'embedding_table', 'embedding') -> 'y_embedder.embedding_table.weight';
  ('shared_blocks', 2, 'mlp_scale') with own={'mlp_scale'} -> 'shared_blocks.2.mlp_scale'.
  """
  *module, leaf = (getattr(p, "key", getattr(p, "idx", p)) for p in path)
  if module and leaf not in own:
    if leaf not in TORCH_LEAF:
      raise ValueError(f"no torch name for parameter path {tuple(path)}")
    leaf = TORCH_LEAF[leaf]
  return ".".join(str(p) for p in module + [leaf])


def _leaf(path) -> str:
  return str(getattr(path[-1], "key", path[-1]))


# Axis order of a torch weight in terms of the Flax kernel's axes, by kernel rank.
_KERNEL_PERMUTATION = {2: (1, 0), 4: (3, 2, 0, 1)}


def _permutation(path, ndim: int) -> tuple[int, ...]:
  """The transpose taking a Flax parameter to its torch layout (identity unless a kernel)."""
  if _leaf(path) == "kernel":
    return _KERNEL_PERMUTATION[ndim]
  return tuple(range(ndim))


def _state_dict(net_params, own=()) -> dict[str, np.ndarray]:
  """{torch_name: new C-contiguous float32 array in torch's layout} of flax params (a pure dict,
  per block)."""
  state = {}
  for path, value in traverse_util.flatten_dict(net_params).items():
    value = np.asarray(value, np.float32)
    state[torch_name(path, own)] = np.array(value.transpose(_permutation(path, value.ndim)),
                                            order="C")
  return state


def _is_stacked(blocks) -> bool:
  return isinstance(blocks, dict) and not all(isinstance(key, int) for key in blocks)


def per_block(net_params, take=lambda value, i: value[i], stacks=("blocks",)):
  """Net params with every stack of blocks (DiT's 'blocks'; iMF's imf_dit.STACKS) held stacked
  ([depth, ...] leaves) in the per-block layout {i: ...}; take(leaf, i) picks block i of a leaf."""
  out = dict(net_params)
  for name in stacks:
    if _is_stacked(net_params.get(name)):
      flat = traverse_util.flatten_dict(net_params[name])
      depth = next(iter(flat.values())).shape[0]
      out[name] = {i: traverse_util.unflatten_dict(
          {path: take(value, i) for path, value in flat.items()}) for i in range(depth)}
  return out


def stacked(net_params, stacks=("blocks",)):
  """The inverse of `per_block`: every stack's per-block params {i: ...} stacked along a leading
  axis."""
  out = dict(net_params)
  for name in stacks:
    flats = [traverse_util.flatten_dict(net_params[name][i]) for i in range(len(net_params[name]))]
    out[name] = traverse_util.unflatten_dict(
        {path: np.stack([np.asarray(flat[path]) for flat in flats]) for path in flats[0]})
  return out


# --- DiT and JiT ----------------------------------------------------------------------------------

def to_torch(net_params, pos_embed) -> dict[str, np.ndarray]:
  """The torch DiT / JiT state_dict (name -> new C-contiguous float32 array) of Flax net params (a
  pure dict, blocks per block or stacked).

  pos_embed: the model's fixed [T, D] position embedding (`model.pos_embed()`).
  """
  state = _state_dict(per_block(net_params))
  state[POS_EMBED] = np.array(pos_embed, np.float32)[None]
  return state


def _keep_mean_channels(value: np.ndarray, channels: int) -> np.ndarray:
  """final_layer.linear rows (p, q, 2C) -> (p, q, C): DiT's learned-sigma output keeps its ε mean.

  DiT's unpatchify reads each token's outputs in (p, q, c) order, c fastest, and
  learn_sigma=True models output [ε (C channels), σ interpolation (C channels)].
  """
  rows = value.reshape((-1, 2 * channels) + value.shape[1:])
  return rows[:, :channels].reshape((-1,) + value.shape[1:])


def from_torch(state_dict, abstract_net, pos_embed, *, drop_learned_sigma: bool = False):
  """Flax net params (a pure dict of float32 arrays) from a torch DiT / JiT state_dict.

  state_dict: name -> array (numpy, or CPU torch tensors from `state_dict()`); abstract_net:
  the pure dict of the target model's parameters (arrays or ShapeDtypeStructs; blocks per block
  or stacked, and the result has the same layout), whose shapes are checked; pos_embed: the
  target's fixed [T, D] embedding, which the state_dict's must equal.
  A learn_sigma=True DiT checkpoint (2C output channels, e.g. the released DiT-XL/2) raises
  unless drop_learned_sigma=True, which keeps the first C channels (the ε mean).
  """
  state = {name: np.asarray(value) for name, value in state_dict.items()}
  if _is_stacked(abstract_net.get("blocks")):
    return stacked(from_torch(state, per_block(abstract_net, take=_one_block), pos_embed,
                              drop_learned_sigma=drop_learned_sigma))
  abstract = traverse_util.flatten_dict(abstract_net)
  names = {torch_name(path): path for path in abstract}
  missing = sorted(set(names) - set(state))
  unexpected = sorted(set(state) - set(names) - {POS_EMBED})
  if missing or unexpected or POS_EMBED not in state:
    raise ValueError(f"state_dict does not match this model: missing {missing[:8]}"
                     f"{' (and pos_embed)' if POS_EMBED not in state else ''}, "
                     f"unexpected {unexpected[:8]} ({len(missing)} missing, "
                     f"{len(unexpected)} unexpected)")
  expected_pos = np.asarray(pos_embed, np.float32)[None]
  if state[POS_EMBED].shape != expected_pos.shape or not np.allclose(
      state[POS_EMBED], expected_pos, atol=1e-5):
    raise ValueError(f"pos_embed {state[POS_EMBED].shape} is not this model's fixed sin-cos "
                     f"embedding {expected_pos.shape}: a different input size, patch or width")

  channels = next(abstract[path].shape[2] for path in abstract
                  if torch_name(path).startswith("x_embedder.")
                  and len(abstract[path].shape) == 4)
  params = {}
  for name, path in names.items():
    value = state[name].astype(np.float32)
    permutation = _permutation(path, len(abstract[path].shape))
    expected = tuple(abstract[path].shape[axis] for axis in permutation)
    if name in FINAL_LINEAR and value.shape[0] == 2 * expected[0]:
      if not drop_learned_sigma:
        raise ValueError(
            f"{name} has {value.shape[0]} outputs, twice this model's {expected[0]}: a "
            "learn_sigma=True DiT checkpoint (2C output channels). Pass drop_learned_sigma=True "
            "(--drop_learned_sigma) to keep the first C channels, the ε mean")
      value = _keep_mean_channels(value, channels)
    params[path] = _from_torch_layout(name, value, permutation, expected)
  return traverse_util.unflatten_dict(params)


def _one_block(leaf, i):
  """per_block's `take` on shapes only: block i of a stacked leaf, as its shape."""
  del i
  return types.SimpleNamespace(shape=leaf.shape[1:])


def _from_torch_layout(name, value, permutation, expected) -> np.ndarray:
  """A torch tensor of `expected` torch shape in the Flax layout (permutation inverted)."""
  if value.shape != expected:
    raise ValueError(f"{name}: shape {value.shape}, this model expects {expected}")
  return np.array(value.transpose(np.argsort(permutation)), order="C")


# --- SongUNet (EDM's and IMM's; export/torch_unet.SongUNet) ---------------------------------------

def unet_to_torch(net_params) -> dict[str, np.ndarray]:
  """EDM's SongUNet state_dict (IMMPrecond's without the 'model.' prefix) of flax net params (a
  pure dict): torch names, kernels transposed, and EDM's persistent resample_filter buffers of
  conv0 and skip in every 'RxR_down' / 'RxR_up' block; C-contiguous float32 arrays."""
  state = _state_dict(net_params)
  for section in ("enc", "dec"):
    for name in net_params[section]:
      if name.endswith(("_down", "_up")):
        for layer in ("conv0", "skip"):
          state[f"{section}.{name}.{layer}.resample_filter"] = unet.resample_filter()[None, None]
  return state


def unet_from_torch(state_dict, build):
  """(graphdef, flax net params) of `build()` (a SongUNet) from an EDM / IMM SongUNet state_dict,
  whose resample_filter buffers must hold this model's filter (`load` checks the rest: every
  parameter present, with its shape, and nothing left over)."""
  buffers = [key for key in state_dict if key.endswith(".resample_filter")]
  filter_ = unet.resample_filter().reshape(-1)
  for key in buffers:
    if not np.array_equal(np.asarray(state_dict[key]).reshape(-1), filter_):
      raise ValueError(f"{key!r} is not DDPM++'s resample filter {unet.RESAMPLE_FILTER}: another "
                       "U-Net")
  return load(build, state_dict, ignore=buffers)


# --- iMF's DiT (export/torch_imf_dit.py) ----------------------------------------------------------

def imf_dit_to_torch(net_params) -> dict[str, np.ndarray]:
  """The torch twin's state_dict (name -> C-contiguous float32 array) of iMF DiT params (a pure
  dict, stacks per block or stacked)."""
  return _state_dict(per_block(net_params, stacks=imf_dit.STACKS), own=IMF_DIT_OWN)


def imf_dit_from_torch(state_dict, abstract_net) -> dict:
  """iMF DiT params (a pure dict of float32 arrays, in abstract_net's layout: stacks per block
  or stacked) from the torch twin's state_dict, which must hold every parameter, with its
  shape, and nothing else."""
  if _is_stacked(abstract_net.get(imf_dit.STACKS[0])):
    blocks = per_block(abstract_net, take=_one_block, stacks=imf_dit.STACKS)
    return stacked(imf_dit_from_torch(state_dict, blocks), stacks=imf_dit.STACKS)
  abstract = traverse_util.flatten_dict(abstract_net)
  names = {torch_name(path, IMF_DIT_OWN): path for path in abstract}
  missing, unexpected = sorted(set(names) - set(state_dict)), sorted(set(state_dict) - set(names))
  if missing or unexpected:
    raise ValueError(f"state_dict does not match this iMF DiT: missing {missing[:8]}, "
                     f"unexpected {unexpected[:8]} ({len(missing)} missing, "
                     f"{len(unexpected)} unexpected)")
  params = {}
  for name, path in names.items():
    permutation = _permutation(path, len(abstract[path].shape))
    expected = tuple(abstract[path].shape[axis] for axis in permutation)
    params[path] = _from_torch_layout(name, np.asarray(state_dict[name], np.float32),
                                      permutation, expected)
  return traverse_util.unflatten_dict(params)


# --- any network, by its torch names --------------------------------------------------------------

def to_flax_layout(tensor: np.ndarray, ndim: int) -> np.ndarray:
  """A torch weight in the layout of a flax variable with `ndim` dims (the module docstring's
  transposes, inverted)."""
  if ndim == 4:
    if tensor.ndim == 2:  # a 1x1 conv stored as a linear weight
      tensor = tensor[:, :, None, None]
    return np.transpose(tensor, (2, 3, 1, 0))
  if ndim == 2:
    if tensor.ndim == 4:  # a linear layer stored as a 1x1 conv (old checkpoints)
      tensor = tensor[:, :, 0, 0]
    return np.transpose(tensor)
  return tensor


def load(build: Callable[[], nnx.Module], state_dict: dict[str, np.ndarray],
         ignore: Iterable[str] = ()):
  """(graphdef, pure dict of float32 arrays) of `build()` with every variable from state_dict.

  Every variable must be in state_dict (under its `torch_name`) with the right shape; every key
  of state_dict must be used, except those in `ignore`. The model is built abstractly (no random
  init).

    graphdef, params = load(lambda: Model(...), state_dict)
    y = nnx.merge(graphdef, params)(x)
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  used = set()

  def fill(path, leaf):
    key = torch_name(path)
    if key not in state_dict:
      raise KeyError(f"the weights have no {key!r} (needed for {leaf.shape})")
    value = to_flax_layout(state_dict[key], len(leaf.shape))
    if value.shape != tuple(leaf.shape):
      raise ValueError(f"{key!r} has shape {state_dict[key].shape}; the model needs "
                       f"{tuple(leaf.shape)} in flax layout (got {value.shape})")
    used.add(key)
    return np.ascontiguousarray(value, np.float32)

  params = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(abstract))
  unused = sorted(set(state_dict) - used - set(ignore))
  if unused:
    raise ValueError(f"{len(unused)} weights do not fit the model, e.g. {unused[:5]}")
  return graphdef, params


# --- each backbone's torch side, by model.name ----------------------------------------------------

def _pos_embed(config) -> np.ndarray:
  """The fixed [T, D] sin-cos embedding of config's DiT or JiT (torch's `pos_embed`, unbatched)."""
  from kdiff_jax import models
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0))).pos_embed()


def _common(config) -> dict:
  model, data = config.model, config.data
  return dict(input_size=data.image_size, patch_size=model.patch_size,
              in_channels=data.channels, mlp_ratio=model.mlp_ratio,
              num_classes=data.num_classes, time_scale=model.time_scale)


def _dit_spec(config) -> dict:
  model = config.model
  depth, hidden_size, num_heads = dit.SIZES[model.size]
  return dict(hidden_size=hidden_size, depth=depth, num_heads=model.num_heads or num_heads,
              second_time_embedder=model.second_time_embedder, norm=model.norm,
              qk_norm=model.qk_norm, modulation_norm=model.modulation_norm,
              guidance_embedder=model.guidance_embedder, **_common(config))


def _jit_spec(config) -> dict:
  depth, hidden_size, num_heads, bottleneck_dim, in_context_len, in_context_start = (
      jit.SIZES[config.model.size])
  return dict(hidden_size=hidden_size, depth=depth, num_heads=num_heads,
              bottleneck_dim=bottleneck_dim, in_context_len=in_context_len,
              in_context_start=in_context_start, **_common(config))


def _unet_spec(config) -> dict:
  model, data = config.model, config.data
  model_channels, channel_mult, num_blocks, attn_resolutions = unet.SIZES[model.size]
  return dict(input_size=data.image_size, in_channels=data.channels,
              num_classes=data.num_classes if model.class_conditional else 0,
              model_channels=model_channels, channel_mult=list(channel_mult),
              num_blocks=num_blocks, attn_resolutions=list(attn_resolutions),
              dropout=model.dropout, second_time_embedder=model.second_time_embedder,
              time_scale=model.time_scale)


def _in_context_dit_spec(config, depth, hidden_size, num_heads, head_depth) -> dict:
  model, data = config.model, config.data
  return dict(input_size=data.image_size, patch_size=model.patch_size,
              in_channels=data.channels, hidden_size=hidden_size, depth=depth,
              num_heads=num_heads, head_depth=head_depth, mlp_ratio=model.mlp_ratio,
              num_classes=data.num_classes)


def _imf_dit_spec(config) -> dict:
  return _in_context_dit_spec(config, *imf_dit.SIZES[config.model.size])


def _pmf_dit_spec(config) -> dict:
  model = config.model
  *sizes, bottleneck_dim = pmf_dit.SIZES[model.size]
  return dict(_in_context_dit_spec(config, *sizes), bottleneck_dim=bottleneck_dim,
              prediction=model.prediction, t_floor=model.t_floor,
              w_k_scale=config.objective.kdiff.w_k_scale)


def _abstract_net(config):
  from kdiff_jax import state
  return state.build_model(config).abstract_net


def _build(config):
  from kdiff_jax import models
  return lambda: models.build(config, nnx.Rngs(0))


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A network's torch side: torch_load.build's kwargs of a config, its state_dict from Flax
  params, and Flax params from a state_dict (None where no import exists)."""
  spec: Callable
  to_torch: Callable
  from_torch: Callable | None = None


BACKBONES = {
    "dit": Backbone(_dit_spec, lambda config, net: to_torch(net, _pos_embed(config)),
                    lambda config, sd, drop: from_torch(sd, _abstract_net(config),
                                                        _pos_embed(config),
                                                        drop_learned_sigma=drop)),
    "jit": Backbone(_jit_spec, lambda config, net: to_torch(net, _pos_embed(config)),
                    lambda config, sd, drop: from_torch(sd, _abstract_net(config),
                                                        _pos_embed(config),
                                                        drop_learned_sigma=drop)),
    "unet": Backbone(_unet_spec, lambda config, net: unet_to_torch(net),
                     lambda config, sd, drop: unet_from_torch(sd, _build(config))[1]),
    "imf_dit": Backbone(_imf_dit_spec, lambda config, net: imf_dit_to_torch(net),
                        lambda config, sd, drop: imf_dit_from_torch(sd, _abstract_net(config))),
    "pmf_dit": Backbone(_pmf_dit_spec, lambda config, net: imf_dit_to_torch(net)),
}


def backbone(config) -> Backbone:
  """BACKBONES[model.name], or a ValueError naming the networks that have a torch twin."""
  if config.model.name not in BACKBONES:
    raise ValueError(f"model.name={config.model.name!r}: export supports {sorted(BACKBONES)} "
                     "(the torch twins have no MLP)")
  return BACKBONES[config.model.name]


def model_spec(config) -> dict:
  """torch_load.build's constructor kwargs of config's model, with its 'name'."""
  return dict(name=config.model.name, **backbone(config).spec(config))


def net_to_torch(config, net_params) -> dict[str, np.ndarray]:
  """The torch state_dict of config's network."""
  return backbone(config).to_torch(config, net_params)


def net_from_torch(config, state_dict, *, drop_learned_sigma: bool = False) -> dict:
  """Flax net params of config's network from a torch state_dict (from_torch's
  drop_learned_sigma)."""
  importer = backbone(config).from_torch
  if importer is None:
    raise ValueError(f"model.name={config.model.name!r}: importing a torch state_dict is "
                     f"supported for {sorted(n for n, b in BACKBONES.items() if b.from_torch)}")
  return importer(config, state_dict, drop_learned_sigma)

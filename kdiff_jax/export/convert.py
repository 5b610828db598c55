"""Flax <-> PyTorch state_dict conversion, in NumPy (no torch import here).

The Flax DiT and JiT keep the attribute names of facebookresearch/DiT `models.py` and LTH14/JiT
`model_jit.py`, so a parameter's torch key is `dit.torch_name(path)` and its value a transpose:

  Linear kernel [in, out]            -> weight [out, in]              kernel.T
  Conv kernel [kh, kw, C_in, C_out]  -> weight [C_out, C_in, kh, kw]  kernel.transpose(3, 2, 0, 1)
  bias, Embed table, norm scale, JiT's in_context_posemb             as is

torch's state_dict also holds the fixed sin-cos `pos_embed` [1, T, D] (DiT and JiT keep it as a
frozen nn.Parameter; here it is the model's numpy constant `model.pos_embed()` [T, D]).
A model with model.scan_blocks holds its blocks stacked (blocks/attn/qkv/kernel of shape
[depth, ...]); `per_block` and `stacked` convert to and from the per-block layout
(blocks/3/attn/qkv/kernel) that torch names, so both layouts give the same state_dict.
Both directions are exact (transposes only): Flax -> torch -> Flax gives the same bits.
"""
import types

import numpy as np
from flax import traverse_util

from kdiff_jax.models import dit

POS_EMBED = "pos_embed"
FINAL_LINEAR = ("final_layer.linear.weight", "final_layer.linear.bias")


def _leaf(path) -> str:
  return str(getattr(path[-1], "key", path[-1]))


# Axis order of a torch weight in terms of the Flax kernel's axes, by kernel rank.
_KERNEL_PERMUTATION = {2: (1, 0), 4: (3, 2, 0, 1)}


def _permutation(path, ndim: int) -> tuple[int, ...]:
  """The transpose taking a Flax parameter to its torch layout (identity unless a kernel)."""
  if _leaf(path) == "kernel":
    return _KERNEL_PERMUTATION[ndim]
  return tuple(range(ndim))


def _is_stacked(net_params) -> bool:
  blocks = net_params.get("blocks")
  return isinstance(blocks, dict) and not all(isinstance(key, int) for key in blocks)


def per_block(net_params, take=lambda value, i: value[i]):
  """Net params with stacked blocks ([depth, ...] leaves) in the per-block layout {i: ...};
  take(leaf, i) picks block i of a leaf."""
  if not _is_stacked(net_params):
    return net_params
  flat = traverse_util.flatten_dict(net_params["blocks"])
  depth = next(iter(flat.values())).shape[0]
  return {**net_params, "blocks": {i: traverse_util.unflatten_dict(
      {path: take(value, i) for path, value in flat.items()}) for i in range(depth)}}


def stacked(net_params):
  """The inverse of `per_block`: per-block params {i: ...} with the blocks stacked."""
  flats = [traverse_util.flatten_dict(net_params["blocks"][i])
           for i in range(len(net_params["blocks"]))]
  return {**net_params, "blocks": traverse_util.unflatten_dict(
      {path: np.stack([flat[path] for flat in flats]) for path in flats[0]})}


def to_torch(net_params, pos_embed) -> dict[str, np.ndarray]:
  """The torch state_dict (name -> new C-contiguous float32 array) of Flax net params (a pure dict,
  blocks per block or stacked).

  pos_embed: the model's fixed [T, D] position embedding (`model.pos_embed()`).
  """
  state = {}
  for path, value in traverse_util.flatten_dict(per_block(net_params)).items():
    value = np.asarray(value, np.float32)
    state[dit.torch_name(path)] = np.array(value.transpose(_permutation(path, value.ndim)),
                                           order="C")
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
  if _is_stacked(abstract_net):
    one_block = lambda leaf, i: types.SimpleNamespace(shape=leaf.shape[1:])  # shapes only
    return stacked(from_torch(state, per_block(abstract_net, take=one_block), pos_embed,
                              drop_learned_sigma=drop_learned_sigma))
  abstract = traverse_util.flatten_dict(abstract_net)
  names = {dit.torch_name(path): path for path in abstract}
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
                  if dit.torch_name(path).startswith("x_embedder.")
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
    if value.shape != expected:
      raise ValueError(f"{name}: shape {value.shape}, this model expects {expected}")
    params[path] = np.array(value.transpose(np.argsort(permutation)), order="C")
  return traverse_util.unflatten_dict(params)

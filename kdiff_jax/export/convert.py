"""Flax <-> PyTorch state_dict conversion, in NumPy (no torch import here).

The Flax DiT and JiT keep the attribute names of facebookresearch/DiT `models.py` and LTH14/JiT
`model_jit.py`, so a parameter's torch key is `dit.torch_name(path)` and its value a transpose:

  Linear kernel [in, out]            -> weight [out, in]              kernel.T
  Conv kernel [kh, kw, C_in, C_out]  -> weight [C_out, C_in, kh, kw]  kernel.transpose(3, 2, 0, 1)
  bias, Embed table, norm scale, JiT's in_context_posemb             as is

torch's state_dict also holds the fixed sin-cos `pos_embed` [1, T, D] (DiT and JiT keep it as a
frozen nn.Parameter; here it is the model's numpy constant `model.pos_embed()` [T, D]).
Both directions are exact (transposes only): Flax -> torch -> Flax gives the same bits.
"""
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


def to_torch(net_params, pos_embed) -> dict[str, np.ndarray]:
  """The torch state_dict (name -> new C-contiguous float32 array) of Flax net params (a pure dict).

  pos_embed: the model's fixed [T, D] position embedding (`model.pos_embed()`).
  """
  state = {}
  for path, value in traverse_util.flatten_dict(net_params).items():
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
  the pure dict of the target model's parameters (arrays or ShapeDtypeStructs), whose shapes are
  checked; pos_embed: the target's fixed [T, D] embedding, which the state_dict's must equal.
  A learn_sigma=True DiT checkpoint (2C output channels, e.g. the released DiT-XL/2) raises
  unless drop_learned_sigma=True, which keeps the first C channels (the ε mean).
  """
  state = {name: np.asarray(value) for name, value in state_dict.items()}
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

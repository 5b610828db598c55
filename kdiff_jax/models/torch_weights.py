"""PyTorch state_dicts into Flax NNX models whose attribute paths mirror the torch module tree.

A variable at nnx path ('mid_block', 'attentions', 0, 'to_q', 'kernel') is the torch tensor
'mid_block.attentions.0.to_q.weight': the path joined with '.', its leaf renamed by
`TORCH_LEAF`. Layouts differ only by a transpose: a conv kernel is [kh, kw, in, out] here and
[out, in, kh, kw] in torch, a linear kernel [in, out] here and [out, in] in torch; vectors are
the same.

  graphdef, params = load(lambda: Model(...), state_dict)   # params: a pure dict of arrays
  y = nnx.merge(graphdef, params)(x)

Reading files: `.safetensors` (safetensors' numpy reader), `.npz` (arrays under the torch
keys), or `.pth` / `.pt` / `.bin` (needs torch; read with `weights_only=True`).
"""
import os
from typing import Callable, Iterable

import jax
import numpy as np
from flax import nnx

# nnx leaf name -> torch parameter / buffer name.
TORCH_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean",
              "var": "running_var"}


def torch_key(path) -> str:
  """('Mixed_5b', 'branch1x1', 'bn', 'var') -> 'Mixed_5b.branch1x1.bn.running_var'."""
  *module, leaf = (getattr(p, "key", getattr(p, "idx", p)) for p in path)
  if leaf not in TORCH_LEAF:
    raise ValueError(f"no torch name for variable path {tuple(path)}")
  return ".".join(str(p) for p in module + [TORCH_LEAF[leaf]])


def to_flax_layout(tensor: np.ndarray, ndim: int) -> np.ndarray:
  """A torch weight in the layout of a flax variable with `ndim` dims (see module docstring)."""
  if ndim == 4:
    if tensor.ndim == 2:  # a 1x1 conv stored as a linear weight
      tensor = tensor[:, :, None, None]
    return np.transpose(tensor, (2, 3, 1, 0))
  if ndim == 2:
    if tensor.ndim == 4:  # a linear layer stored as a 1x1 conv (old checkpoints)
      tensor = tensor[:, :, 0, 0]
    return np.transpose(tensor)
  return tensor


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{torch key: float32 numpy array} from a .safetensors, .npz or torch pickle file.

  A torch file holding {'model': ..., 'ema': ...} (DiT's training checkpoints, export's .pt)
  gives its 'ema' entry, as DiT's find_model does; a bare state_dict is used as is.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file {path!r} does not exist")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    tensors = load_file(path)
  elif path.endswith(".npz"):
    with np.load(path) as archive:
      tensors = {key: archive[key] for key in archive.files}
  else:
    import torch
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "ema" in state:
      state = state["ema"]
    tensors = {key: value.float().numpy() for key, value in state.items()}
  return {key: np.asarray(value, np.float32) for key, value in tensors.items()
          if not key.endswith("num_batches_tracked")}


def load(build: Callable[[], nnx.Module], state_dict: dict[str, np.ndarray],
         ignore: Iterable[str] = ()):
  """(graphdef, pure dict of float32 arrays) of `build()` with every variable from state_dict.

  Every variable must be in state_dict with the right shape; every key of state_dict must be
  used, except those in `ignore`. The model is built abstractly (no random init).
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  used = set()

  def fill(path, leaf):
    key = torch_key(path)
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

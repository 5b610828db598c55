"""PyTorch state_dict files read into NumPy: `.safetensors` (safetensors' numpy reader), `.npz`
(arrays under the torch keys), or `.pth` / `.pt` / `.bin` (needs torch; read with
`weights_only=True`, onto the CPU). Apart from export/weight_files.py so that the training path
(the perceptual feature nets, kdiff_jax/perceptual.py) reads weight files without reaching the
evaluators' networks that weight_files loads.
"""
import os

import numpy as np


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

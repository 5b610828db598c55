"""An export's PyTorch module: `build(meta['model'])` picks the twin by name and `load(json_path)`
fills it from the export's .safetensors. torch, numpy and safetensors only, no JAX:

  from kdiff_jax.export import torch_load, torch_sampling
  model, meta = torch_load.load("step1500.json")
  images = torch_sampling.sample(model, meta, noise, labels)
"""
import json
import os

from torch import nn

from kdiff_jax.export.torch_dit import DiT
from kdiff_jax.export.torch_imf_dit import ImfDiT
from kdiff_jax.export.torch_jit import JiT
from kdiff_jax.export.torch_pmf_dit import PmfDiT
from kdiff_jax.export.torch_unet import SongUNet


ARCHITECTURES = {"dit": DiT, "imf_dit": ImfDiT, "jit": JiT, "pmf_dit": PmfDiT, "unet": SongUNet}


def build(model_meta: dict) -> nn.Module:
  """The module of an export's meta['model'] ({'name': one of ARCHITECTURES,
  **constructor kwargs})."""
  kwargs = dict(model_meta)
  name = kwargs.pop("name")
  if name not in ARCHITECTURES:
    raise ValueError(f"model name {name!r}: torch_load builds {sorted(ARCHITECTURES)}")
  return ARCHITECTURES[name](**kwargs)


def load(json_path: str, device="cpu"):
  """(model in eval mode, meta) from an export's JSON and the .safetensors named in it."""
  from safetensors.torch import load_file
  with open(json_path) as f:
    meta = json.load(f)
  model = build(meta["model"])
  weights = os.path.join(os.path.dirname(json_path), meta["files"]["safetensors"])
  model.load_state_dict(load_file(weights, device=str(device)), strict=True)
  return model.to(device).eval(), meta

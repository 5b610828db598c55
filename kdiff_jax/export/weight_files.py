"""PyTorch weight files, read into our networks: the reader, and the released networks that we only
ever load (the SD-VAE, pytorch-fid's FID Inception), by their torch names (convert.load).

Reading files: `read_state_dict` (export/state_dicts.py, re-exported here) reads `.safetensors`,
`.npz` (arrays under the torch keys), or `.pth` / `.pt` / `.bin` (needs torch; `weights_only=True`).

  graphdef, params, arch = weight_files.vae("/weights/sd-vae-ft-ema")   # models/vae.py
  decode, params = weight_files.vae_decoder(path)  # jitted decode(params, z), read once per path
  graphdef, params = weight_files.inception("pt_inception-2015-12-05-6726825d.pth")

pytorch-fid's weights (https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/
pt_inception-2015-12-05-6726825d.pth) convert, with torch, into an .npz that loads without it:
`python -m kdiff_jax.export.weight_files IN.pth OUT.npz`.
"""
import functools
import re
import sys

import jax
import numpy as np
from flax import nnx

from kdiff_jax.export import convert
from kdiff_jax.export.state_dicts import read_state_dict  # noqa: F401 (read here too)
from kdiff_jax.models import inception as inception_lib
from kdiff_jax.models import vae as vae_lib

# Old diffusers attention names (checkpoints saved before diffusers 0.14) -> current names.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _current_name(key: str) -> str:
  return re.sub(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.",
                lambda m: m.group(1) + _LEGACY_ATTENTION[m.group(2)] + ".", key)


@functools.lru_cache(maxsize=2)
def vae(path: str):
  """(graphdef, params, arch) of the VAE in a diffusers directory or safetensors file (read
  once)."""
  arch = vae_lib.architecture(path)
  state_dict = {_current_name(key): value
                for key, value in read_state_dict(vae_lib.weights_file(path)).items()}
  graphdef, params = convert.load(lambda: vae_lib.AutoencoderKL(**arch, rngs=nnx.Rngs(0)),
                                  state_dict)
  return graphdef, params, arch


@functools.lru_cache(maxsize=2)
def vae_decoder(path: str):
  """(decode(params, z) -> images, jitted; params) of the VAE at path."""
  graphdef, params, _ = vae(path)
  return jax.jit(lambda params, z: nnx.merge(graphdef, params).decode(z)), params


def inception(path: str):
  """(graphdef, params) of the FID InceptionV3 from pytorch-fid's .pth or its .npz conversion."""
  return convert.load(lambda: inception_lib.InceptionV3(rngs=nnx.Rngs(0)), read_state_dict(path))


def inception_npz(pth_path: str, npz_path: str) -> None:
  """pytorch-fid's .pth -> an .npz of the same tensors (torch keys), loadable without torch."""
  np.savez(npz_path, **read_state_dict(pth_path))


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit("usage: python -m kdiff_jax.export.weight_files "
             "pt_inception-2015-12-05-6726825d.pth inception.npz")
  inception_npz(sys.argv[1], sys.argv[2])

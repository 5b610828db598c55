"""PyTorch export and import.

JAX side (imports torch only to write .pt and read .pth):
  convert.py         Flax params <-> torch state_dict, every network's names and transposes (DiT,
                     JiT, SongUNet, iMF's and pMF's DiTs; any network by its torch names), NumPy only
  state_dicts.py     PyTorch weight files (.safetensors, .npz, .pth) read into NumPy
  weight_files.py    the SD-VAE's and FID Inception's released weights loaded into models/vae.py
                     and inception.py
  checkpoints.py     checkpoint -> .safetensors / .pt / .json; DiT-format state_dict -> Flax params
                     or a step-0 checkpoint to fine-tune
  pretrained.py, pickles.py  released checkpoints (DiT, IMM) read into our layout
  released_imf.py    Lyy-iiis/imeanflow's iMF flax checkpoints (orbax or msgpack) read as numpy

Torch side (torch, numpy and safetensors; needs no JAX), one twin per network of models/:
  torch_layers.py    the twin of models/layers.py (embedders, attention, MLPs, RoPE, patches)
  torch_dit.py       the twin of models/dit.py (DiT, its adaLN-Zero block and final layer)
  torch_jit.py       the twin of models/jit.py (JiT)
  torch_unet.py      the twin of models/unet.py (SongUNet, EDM's names)
  torch_imf_dit.py   the twin of models/imf_dit.py (iMF's in-context DiT)
  torch_pmf_dit.py   the twin of models/pmf_dit.py (pixel MeanFlow's DiT, which returns u and v)
  torch_sampling.py  the torch schedule, to_x_eps and every exported sampler (flow ODE, IMM,
                     MeanFlow, iMF, TVM), dispatched by the name the export gives
  torch_load.py      build / load an export's module from its JSON and .safetensors

main.py runs them: --mode=export and --mode=import.

Nothing is imported here, so the torch modules load without JAX and the JAX side without torch.
"""

"""Denoiser networks. `build(config, rngs)` makes the one config.model names; `check` and `RULES`
validate the model section against each network's own tables of sizes and patches."""
import jax.numpy as jnp
from flax import nnx

from kdiff_jax.models import dit, imf_dit, jit, layers, mlp, pmf_dit, unet
from kdiff_jax.models.dit import DiT
from kdiff_jax.models.jit import JiT
from kdiff_jax.models.mlp import MLP
from kdiff_jax.models.unet import SongUNet
from kdiff_jax.schema import boolean, number, one_of

# name -> (its table of sizes, its patch sizes (None for the MLP), builder(config, dtype, rngs)).
# The U-Net convolves every pixel: its one "patch size" is 1 (unet.check says so).
ARCHITECTURES = {
    "dit": (dit.SIZES, dit.PATCH_SIZES, dit.dit_from_config),
    "jit": (jit.SIZES, jit.PATCH_SIZES, jit.jit_from_config),
    "mlp": (None, None, mlp.mlp_from_config),
    "unet": (unet.SIZES, (1,), unet.unet_from_config),
    "imf_dit": (imf_dit.SIZES, imf_dit.PATCH_SIZES, imf_dit.imf_dit_from_config),
    "pmf_dit": (pmf_dit.SIZES, pmf_dit.PATCH_SIZES, pmf_dit.pmf_dit_from_config),
}
MODELS = tuple(ARCHITECTURES)
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

RULES = {
    "model.name": one_of(*MODELS),
    "model.size": one_of(*dict.fromkeys(size for sizes, _, _ in ARCHITECTURES.values() if sizes
                                        for size in sizes)),
    "model.patch_size": number(1, integer=True),
    "model.mlp_ratio": number(0, low_open=True),
    "model.second_time_embedder": boolean(),
    "model.time_scale": number(0, low_open=True),
    "model.compute_dtype": one_of(*COMPUTE_DTYPES),
    "model.remat": one_of(*layers.REMAT_POLICIES),
    "model.scan_blocks": boolean(),
    "model.attention": one_of(*layers.ATTENTION_IMPLEMENTATIONS),
    "model.mlp_width": number(1, integer=True),
    "model.mlp_depth": number(0, integer=True),
    "model.dropout": number(0, 1, high_open=True),
    "model.class_conditional": boolean(),
    "model.num_heads": number(0, integer=True),
    "model.norm": one_of(*layers.NORMS),
    "model.qk_norm": boolean(),
    "model.modulation_norm": boolean(),
    "model.guidance_embedder": boolean(),
    "model.init": one_of(*dit.INITS),
    "model.prediction": one_of(*pmf_dit.PREDICTIONS),
    "model.t_floor": number(0, 1, low_open=True),
}


def check(config) -> None:
  """The network fits the data's shape, its size and patch exist, and the patch divides the image;
  only the U-Net has dropout or may ignore labels (sampling.check then refuses guidance)."""
  model = config.model
  flat = config.data.name == "toy2d"
  if model.name != "unet" and model.dropout:
    raise ValueError(f"model.dropout={model.dropout}: only model.name='unet' has dropout")
  if model.name != "unet" and not model.class_conditional:
    raise ValueError(f"model.class_conditional=False: model.name={model.name!r} always embeds "
                     "the label (only model.name='unet' can ignore it)")
  if model.name == "mlp" and not flat:
    raise ValueError(f"model.name='mlp' takes flat points: data.name must be 'toy2d', not "
                     f"{config.data.name!r}")
  if model.name != "mlp" and flat:
    raise ValueError(f"model.name={model.name!r} takes images; data.name='toy2d' has flat "
                     "points: use model.name='mlp'")
  check_attention(config)
  check_dit_options(config)
  check_pmf_options(config)
  sizes, patch_sizes, _ = ARCHITECTURES[model.name]
  if sizes is None:
    return
  if model.size not in sizes:
    raise ValueError(f"model.size={model.size!r}: allowed values for model.name={model.name!r} "
                     f"are {list(sizes)}")
  if model.name == "unet":
    unet.check(config)
  if model.patch_size not in patch_sizes:
    raise ValueError(f"model.patch_size={model.patch_size!r}: allowed values for "
                     f"model.name={model.name!r} are {list(patch_sizes)}")
  if config.data.image_size % model.patch_size:
    raise ValueError(f"data.image_size={config.data.image_size} is not a multiple of "
                     f"model.patch_size={model.patch_size}")
  if model.name == "jit" and model.second_time_embedder:
    raise ValueError("model.name='jit' has no second time embedder: "
                     "set model.second_time_embedder=False")
  if model.name == "imf_dit":
    imf_dit.check(config)
  if model.name == "pmf_dit":
    pmf_dit.check(config)


def check_attention(config) -> None:
  """model.attention='cudnn' needs a transformer (dit, jit) and bfloat16 compute (an objective
  that differentiates the network with jax.jvp refuses it too: objectives.check)."""
  model = config.model
  if model.attention == "xla":
    return
  if model.name not in ("dit", "jit"):
    raise ValueError(f"model.attention={model.attention!r}: only model.name='dit' or 'jit' has "
                     f"attention to set, not model.name={model.name!r}")
  if model.compute_dtype != "bfloat16":
    raise ValueError(f"model.attention={model.attention!r} runs in half precision only: set "
                     f"model.compute_dtype='bfloat16' (not {model.compute_dtype!r}) or "
                     "model.attention='xla'")


# The DiT-only fields (TVM's options) with their defaults: another network refuses a change
# (the MLP has a guidance embedder too).
DIT_OPTIONS = {"model.num_heads": 0, "model.norm": "layer_norm", "model.qk_norm": False,
               "model.modulation_norm": False, "model.guidance_embedder": False,
               "model.init": "xavier_uniform"}


def check_dit_options(config) -> None:
  """TVM's DiT options are set on a DiT only, and num_heads divides the hidden size."""
  model = config.model
  if model.name != "dit":
    for path, default in DIT_OPTIONS.items():
      if model.name == "mlp" and path == "model.guidance_embedder":
        continue  # the MLP has one too (TVM on the 2-D toys)
      value = model[path.split(".")[1]]
      if value != default:
        raise ValueError(f"{path}={value!r}: only model.name='dit' has this option (leave it "
                         f"at {default!r} for model.name={model.name!r})")
    return
  hidden_size = dit.SIZES[model.size][1] if model.size in dit.SIZES else None
  if model.num_heads and hidden_size and hidden_size % model.num_heads:
    raise ValueError(f"model.num_heads={model.num_heads} must divide the hidden size "
                     f"{hidden_size} of model.size={model.size!r}")


# pMF's fields (models/pmf_dit.py) with their defaults: another network refuses a change.
PMF_OPTIONS = {"model.prediction": "x", "model.t_floor": pmf_dit.T_FLOOR}


def check_pmf_options(config) -> None:
  """model.prediction and model.t_floor belong to model.name='pmf_dit' (its own conversion)."""
  if config.model.name == "pmf_dit":
    return
  for path, default in PMF_OPTIONS.items():
    value = config.model[path.split(".")[1]]
    if value != default:
      raise ValueError(f"{path}={value!r}: only model.name='pmf_dit' has this option (leave it "
                       f"at {default!r} for model.name={config.model.name!r}; the prediction of "
                       "other networks is objective.prediction)")


def build(config, rngs: nnx.Rngs) -> nnx.Module:
  """The model of config.model.name, sized by config.model and config.data.

  For an abstract model (no allocation): nnx.eval_shape(lambda: build(config, nnx.Rngs(0))).
  """
  if config.model.name not in ARCHITECTURES:
    raise ValueError(f"model.name={config.model.name!r}: allowed values are {list(MODELS)}")
  network = ARCHITECTURES[config.model.name][2](
      config, COMPUTE_DTYPES[config.model.compute_dtype], rngs)
  if config.model.name in ("dit", "jit"):
    layers.set_attention(network, config.model.attention)
  return network


__all__ = ["DiT", "JiT", "MLP", "MODELS", "RULES", "SongUNet", "build", "check"]

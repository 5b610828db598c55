"""Denoiser networks. `build(config, rngs)` makes the one config.model names."""
from flax import nnx

from kdiff_jax.models.dit import DiT, SIZES, dit_from_config, torch_name
from kdiff_jax.models.jit import JiT, jit_from_config
from kdiff_jax.models.mlp import MLP, mlp_from_config

MODELS = ("dit", "mlp", "jit")


def build(config, rngs: nnx.Rngs) -> nnx.Module:
  """The model of config.model.name, sized by config.model and config.data.

  For an abstract model (no allocation): nnx.eval_shape(lambda: build(config, nnx.Rngs(0))).
  """
  if config.model.name == "dit":
    return dit_from_config(config, rngs)
  if config.model.name == "mlp":
    return mlp_from_config(config, rngs)
  if config.model.name == "jit":
    return jit_from_config(config, rngs)
  raise ValueError(f"model.name={config.model.name!r}: allowed values are {list(MODELS)}")


__all__ = ["DiT", "JiT", "MLP", "SIZES", "MODELS", "build", "torch_name"]

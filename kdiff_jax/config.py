"""Config checks that run before anything is built or compiled.

Every field must exist in `configs/default.py` (the schema); named choices must be one of their
registry's names; numbers must be in range. Errors name the field and the allowed values.
"""
import ml_collections

from configs import default
from kdiff_jax import parameterization, samplers, schedules
from kdiff_jax.objectives import flow, imm
from kdiff_jax.samplers import imm as imm_sampling

# Field -> allowed values (from the registries where one exists).
CHOICES = {
    "data.name": ("digits", "synthetic", "tfds", "latents", "toy2d"),
    "model.name": ("dit", "mlp", "jit"),
    "model.size": ("T", "XS", "S", "B", "L", "XL", "H"),
    "model.patch_size": (1, 2, 4, 8, 16, 32),
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots"),
    "objective.schedule": tuple(schedules.SCHEDULES),
    "objective.prediction": parameterization.PREDICTIONS,
    "objective.loss_target": parameterization.PREDICTIONS,
    "objective.time_sampling": flow.TIME_SAMPLINGS,
    "optimizer.lr_schedule": ("constant", "cosine"),
    "sampling.method": samplers.METHODS,
    "sampling.grid": samplers.GRIDS,
    "sampling.options.midpoint": ("t", "eta"),
    "sampling.options.variant": ("bh1", "bh2"),
    "objective.imm.f_type": imm.F_TYPES,
    "objective.imm.kernel": imm.KERNELS,
    "objective.imm.estimator": imm.ESTIMATORS,
    "objective.imm.time_conditioning": imm.TIME_CONDITIONINGS,
    "sampling.imm_method": imm_sampling.METHODS,
    "sampling.imm_grid": imm_sampling.GRIDS,
}

# Field -> (predicate, what it must be).
RANGES = {
    "seed": (lambda v: v >= 0, ">= 0"),
    "data.image_size": (lambda v: v > 0, "> 0"),
    "data.channels": (lambda v: v > 0, "> 0"),
    "data.num_classes": (lambda v: v > 0, "> 0"),
    "model.mlp_ratio": (lambda v: v > 0, "> 0"),
    "model.mlp_width": (lambda v: v > 0, "> 0"),
    "model.mlp_depth": (lambda v: v >= 0, ">= 0"),
    "objective.t_min": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "objective.t_max": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "objective.noise_std": (lambda v: v > 0, "> 0"),
    "objective.logit_normal_std": (lambda v: v > 0, "> 0"),
    "objective.label_dropout": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "objective.min_divisor": (lambda v: v >= 0, ">= 0"),
    "objective.kdiff.k_init": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "objective.kdiff.w_k_scale": (lambda v: v > 0, "> 0"),
    "objective.imm.group_size": (lambda v: v >= 1, ">= 1"),
    "objective.imm.k": (lambda v: v >= 0, ">= 0"),
    "objective.imm.delta": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "objective.imm.bandwidth": (lambda v: v > 0, "> 0"),
    "objective.imm.a": (lambda v: v >= 0, ">= 0"),
    "optimizer.learning_rate": (lambda v: v > 0, "> 0"),
    "optimizer.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "optimizer.b1": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "optimizer.b2": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "optimizer.eps": (lambda v: v > 0, "> 0"),
    "optimizer.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optimizer.grad_clip_norm": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "training.batch_size": (lambda v: v > 0, "> 0"),
    "training.num_steps": (lambda v: v >= 0, ">= 0"),
    "training.ema_decays": (lambda v: all(0.0 <= d < 1.0 for d in v), "decays in [0, 1)"),
    "training.log_every": (lambda v: v > 0, "> 0"),
    "training.sample_every": (lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    "training.checkpoint_every": (lambda v: v > 0, "> 0"),
    "sampling.num_steps": (lambda v: v > 0, "> 0"),
    "sampling.grid_size": (lambda v: v > 0, "> 0"),
    "sampling.num_samples": (lambda v: v > 0, "> 0"),
    "sampling.options.eta": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "sampling.options.S_churn": (lambda v: v >= 0, ">= 0"),
    "sampling.options.S_tmin": (lambda v: v >= 0, ">= 0"),
    "sampling.options.S_tmax": (lambda v: v > 0, "> 0"),
    "sampling.options.S_noise": (lambda v: v >= 0, ">= 0"),
    "sampling.options.rho": (lambda v: v > 0, "> 0"),
    "sampling.options.shift": (lambda v: v > 0, "> 0"),
    "checkpoint.max_to_keep": (lambda v: v > 0, "> 0"),
    "data.latent_shard_size": (lambda v: v > 0, "> 0"),
    "data.encode_batch_size": (lambda v: v > 0, "> 0"),
    "eval.fid_every": (lambda v: v >= 0, ">= 0 (0 = never)"),
    "eval.fid_num_samples": (lambda v: v > 1, "> 1"),
    "eval.num_samples": (lambda v: v > 1, "> 1"),
    "eval.batch_size": (lambda v: v > 0, "> 0"),
    "eval.reference_num_examples": (lambda v: v > 1, "> 1"),
}


def flatten(config, prefix: str = "") -> dict:
  """{'section.field': value} for every leaf of a (nested) ConfigDict."""
  out = {}
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flatten(value, path + "."))
    else:
      out[path] = value
  return out


def validate(config) -> None:
  """Raise ValueError naming the first unknown field or invalid value."""
  schema = flatten(default.get_config())
  values = flatten(config)
  sections = {path.rsplit(".", 1)[0] for path in schema if "." in path}
  for path in values:
    if path not in schema:
      section = path.rsplit(".", 1)[0] if "." in path else ""
      known = sorted(p for p in schema if p.rsplit(".", 1)[0] == section) if section in sections else sorted(sections)
      raise ValueError(f"unknown config field {path!r}; known fields here: {known}")
  for path, allowed in CHOICES.items():
    if values[path] not in allowed:
      raise ValueError(f"{path}={values[path]!r}: allowed values are {list(allowed)}")
  for path, (ok, rule) in RANGES.items():
    if not ok(values[path]):
      raise ValueError(f"{path}={values[path]!r}: must be {rule}")
  if values["objective.name"] != "imm":  # IMM samples with sampling.imm_method
    samplers.configured_options(values["sampling.method"], values["sampling.grid"],
                                config.sampling.options)
  if values["objective.t_min"] >= values["objective.t_max"]:
    raise ValueError(f"objective.t_min={values['objective.t_min']} must be < objective.t_max="
                     f"{values['objective.t_max']}")

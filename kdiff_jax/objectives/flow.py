"""Flow matching / denoising with any prediction and any loss space (the baseline objective).

  x_t = alpha_t·x + sigma_t·n,   n ~ N(0, noise_std^2 I),   t ~ p(t)
  loss = E || convert(net(x_t, t, y), prediction -> loss_target) - target(x, n) ||^2

With prediction = loss_target = 'velocity' on rectified flow this is conditional flow matching
(Lipman et al. 2023, Eq. 23); an x-prediction scored in velocity space is JiT's recipe (Li & He
2025). Changing the loss space is a per-time weighting of the x-loss
(docs/parameterization.md, "Equivalent losses"), e.g. velocity-loss = x-loss / t^2 on
rectified flow. The target goes through the same conversion as the prediction (with the same
`min_divisor` clamp), so a clamp never makes prediction and target disagree.

The trained network is a `Denoiser`: its raw output is a `prediction` at (x_t, t, y).
"""
import dataclasses
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kdiff_jax import parameterization, samplers, schedules
from kdiff_jax.samplers import grids, guidance

TIME_SAMPLINGS = ("uniform", "logit_normal")
# Flow matching reads only the fields every objective shares (objectives.RULES): no section.
RULES = {}


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """A network whose raw output at (x_t, t, labels) is a `prediction` on `schedule`.

  parameterization.to_x_eps turns it into (x_hat, n_hat) with noise scale `noise_std` and the
  clamp `min_divisor` the loss used; k(params, t) gives k-Diff's k for prediction 'u_k' (a
  scalar, or [B] for a time-dependent k), from the parameters being sampled (e.g. the EMA ones).
  """

  schedule: schedules.Schedule
  prediction: str
  noise_std: float = 1.0
  min_divisor: float = 0.0
  k: Callable | None = None

  # The ODE/SDE methods of kdiff_jax.samplers, classifier-free guidance on the raw output.
  methods: ClassVar[tuple] = samplers.METHODS
  torch_sampler: ClassVar[str] = "ode"   # export/torch_sampling.sample_ode

  def check_sampling(self, config) -> None:
    del config   # every guidance scale and interval acts on the raw output

  def time_grid(self, config):
    return sampling_times(config, self.schedule)

  def plan(self, config):
    chosen = config.sampling
    return samplers.plan(schedule=self.schedule, prediction=self.prediction,
                         method=chosen.method, num_steps=chosen.num_steps, grid=chosen.grid,
                         t_start=chosen.t_start, t_end=chosen.t_end, noise_std=self.noise_std,
                         **configured_options(config))

  def sampler(self, config, apply_fn):
    """x_{t_end} by config.sampling's method on the guided raw output; k-Diff's k from the
    params being sampled."""
    chosen = config.sampling

    def sample(params, noise, labels, key):
      network = lambda x_t, t, y: apply_fn(params["net"], x_t, t, y).astype(jnp.float32)
      model_fn = guidance.classifier_free(network, labels, null_label=config.data.num_classes,
                                          scale=chosen.guidance_scale,
                                          interval=tuple(chosen.guidance_interval))
      k = None if self.k is None else (lambda t: self.k(params, t))
      return samplers.sample(
          model_fn, noise, schedule=self.schedule, prediction=self.prediction,
          method=chosen.method, num_steps=chosen.num_steps, key=key, grid=chosen.grid,
          t_start=chosen.t_start, t_end=chosen.t_end, k=k, noise_std=self.noise_std,
          min_divisor=self.min_divisor, **configured_options(config))
    return sample

  def export(self, config, params_by_weights) -> dict:
    del config, params_by_weights
    return dict(prediction=self.prediction)


def configured_options(config) -> dict:
  """The options of sampling.options that config.sampling's method and grid read."""
  chosen = config.sampling
  return samplers.configured_options(chosen.method, chosen.grid, chosen.options)


def sampling_times(config, schedule) -> np.ndarray:
  """The float64 times config.sampling steps through on `schedule`."""
  chosen = config.sampling
  return grids.time_grid(schedule, chosen.num_steps, chosen.grid, t_start=chosen.t_start,
                         t_end=chosen.t_end, **configured_options(config))


def sample_time(rng, batch_size, objective_config):
  """t in [t_min, t_max]: uniform, or logit-normal sigmoid(mean + std·z) (Esser et al. 2024) mapped affinely."""
  cfg = objective_config
  if cfg.time_sampling == "uniform":
    u = jax.random.uniform(rng, (batch_size,), jnp.float32)
  elif cfg.time_sampling == "logit_normal":
    u = jax.nn.sigmoid(cfg.logit_normal_mean + cfg.logit_normal_std *
                       jax.random.normal(rng, (batch_size,), jnp.float32))
  else:
    raise ValueError(f"objective.time_sampling={cfg.time_sampling!r}: allowed values are "
                     f"{list(TIME_SAMPLINGS)}")
  return cfg.t_min + (cfg.t_max - cfg.t_min) * u


def drop_labels(rng, labels, probability, null_label):
  """Replace each label by the null label with the given probability (classifier-free guidance)."""
  drop = jax.random.bernoulli(rng, probability, labels.shape)
  return jnp.where(drop, null_label, labels)


def dropout_kwargs(rng, config) -> dict:
  """{'dropout_rng': key} for a training pass of a network with model.dropout > 0, else {}.

  The key is the fourth stream of the step's rng, split(rng, 4)[3]: with partitionable threefry
  the first three are noised_batch's (time, noise, labels), which stay as they were.
  """
  return {"dropout_rng": jax.random.split(rng, 4)[3]} if config.model.dropout else {}


def noised_batch(batch, rng, config, schedule):
  """(x, n, t, x_t, labels) of one training batch.

  t ~ p(t) (sample_time), n ~ N(0, noise_std^2 I), x_t = alpha_t·x + sigma_t·n, and labels
  replaced by the null label with probability label_dropout.
  """
  cfg = config.objective
  x = batch["image"]
  rng_t, rng_n, rng_y = jax.random.split(rng, 3)
  t = sample_time(rng_t, x.shape[0], cfg)
  n = cfg.noise_std * jax.random.normal(rng_n, x.shape, jnp.float32)
  x_t = parameterization.interpolate(x, n, t, schedule)
  labels = drop_labels(rng_y, batch["label"], cfg.label_dropout, config.data.num_classes)
  return x, n, t, x_t, labels


def regression_loss(prediction_output, x, n, x_t, t, schedule, *, prediction, loss_target,
                    k=None, noise_std=1.0, min_divisor=0.0):
  """Per-example mean squared error between the prediction and the target, both in `loss_target` space."""
  convert = lambda out: parameterization.convert(
      out, x_t, t, schedule, source=prediction, target=loss_target, k=k, noise_std=noise_std,
      min_divisor=min_divisor)
  true_output = parameterization.from_x_eps(prediction, x, n, t, schedule, k=k, noise_std=noise_std)
  error = convert(prediction_output) - jax.lax.stop_gradient(convert(true_output))
  return jnp.mean(jnp.square(error), axis=tuple(range(1, error.ndim)))


def check(config) -> None:
  """Flow matching has no checks beyond the shared fields' rules (objectives.RULES)."""
  del config


def describe(config) -> Denoiser:
  cfg = config.objective
  return Denoiser(schedules.get(cfg.schedule), cfg.prediction, noise_std=cfg.noise_std,
                  min_divisor=cfg.min_divisor)


def build(config, apply_fn):
  cfg = config.objective
  schedule = schedules.get(cfg.schedule)

  def loss(params, batch, rng):
    x, n, t, x_t, labels = noised_batch(batch, rng, config, schedule)
    output = apply_fn(params["net"], x_t, t, labels,
                      **dropout_kwargs(rng, config)).astype(jnp.float32)
    per_example = regression_loss(output, x, n, x_t, t, schedule, prediction=cfg.prediction,
                                  loss_target=cfg.loss_target, noise_std=cfg.noise_std,
                                  min_divisor=cfg.min_divisor)
    value = jnp.mean(per_example)
    return value, {"loss": value}

  return dict(loss=loss, description=describe(config))

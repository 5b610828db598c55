"""Pixel MeanFlow (pMF; Lu et al. 2026, "One-step Latent-free Image Generation with Pixel Mean
Flows", arXiv 2601.22158, official code Lyy-iiis/pMF `pmf.py`; docs/objectives/pmf.md):
objective.name = 'pmf', options objective.pmf.*, on the x-predicting in-context DiT
model.name = 'pmf_dit'.

pMF is iMF (objectives/imf.py) in pixel space. The network predicts two images x̂_u, x̂_v and
returns them as velocities, u = (z_t - x̂_u)/clip(t, t_floor, 1) and v = (z_t - x̂_v)/clip(t,
t_floor, 1), so the objective sees u and v as iMF's does and du/dt (jax.jvp through the network
and its conversion) includes the conversion's dependence on t. What differs from iMF, per
example (the batch mean at the end):

* The times. t, r are two independent draws of p(t) (objective.time_sampling; pMF's logit-normal
  P_mean, P_std are objective.logit_normal_mean, logit_normal_std); with tr_uniform a row is
  redrawn as two U[0, 1) times with probability 0.1; THEN r = t on the layout's rows
  (share_r_equals_t, meanflow.row_layout); THEN t, r = max, min. On an r = t row t is the first
  draw alone (iMF takes the max of two first).
* The noise e ~ noise_std·N(0, I) (pMF's noise_scale: 1 at 256 px, 2 at 512 px),
  z_t = (1 - t)·x + t·e, and the instantaneous velocity target
    v_t = (z_t - x)/clip(t, t_floor, 1)               (= e - x for t >= t_floor)
  with the network's own floor, t_floor = model.t_floor (0.05).
* ω, the interval, label dropout, v_c, v_u, v_g, the JVP with tangents (v_c, 1, 0),
  V = u + (t - r)·sg(du/dt) and loss_u + loss_v = w(L_u) + w(L_v): iMF's, with the v head
  (imf.make_step, imf.velocity_losses; the cheaper step by default, full_batch_jvp the official).
* Perceptual losses (lpips_weight, convnext_weight > 0) on the one-step image x̂ = z_t - t·u
  (every row, unclipped t): the per-example distances d(x̂, x) ('lpips': LPIPS-VGG16, 'convnext':
  squared distance of ConvNeXt-V2 outputs, perceptual.convnext_output; on one shared random
  resized crop; kdiff_jax/perceptual.py), each zeroed where
  t >= perceptual_max_t, then adaptively weighted on its own:
    loss = w(L_u) + w(L_v) + λ_lpips·w(d_lpips·[t < max_t]) + λ_convnext·w(d_convnext·[t < max_t])
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections

from kdiff_jax import parameterization, schedules
from kdiff_jax.objectives import flow, imf, meanflow
from kdiff_jax.rules import boolean, number

# The loss differentiates the network with jax.jvp (objectives.check: attention 'xla').
JVP = True
# build takes the frozen feature networks' module (objectives.build's feature_nets).
FEATURE_NETS = True
# tr_uniform: the probability that a row's (t, r) is redrawn uniformly (hard-coded in pmf.py).
UNIFORM_SHARE = 0.1
# The perceptual terms (perceptual.NETS), each weighted by objective.pmf.<name>_weight.
PERCEPTUAL = ("lpips", "convnext")


def defaults():
  """objective.pmf: iMF's fields (objectives/imf.py) and pMF's; the B/16 recipe sets
  lpips_weight 0.4, convnext_weight 0.1 (configs/pmf_in256.py)."""
  return ml_collections.ConfigDict(dict(
      share_r_equals_t=0.5,       # rows with r = t (no JVP term); a fraction n/m, m <= 64
      adaptive_p=1.0,             # w(L) = L/sg((L + c)^p); p = 0: plain squared error
      adaptive_c=0.01,
      full_batch_jvp=False,       # True: the official step (v_c twice, the JVP on every row)
      s_max=7.0,                  # omega on [1, 1 + s_max] (pMF's cfg_max)
      cfg_beta=1.0,               # p(omega) ∝ omega^-cfg_beta (1: log-uniform)
      interval_split=0.5,         # t_min ~ U[0, split], t_max ~ U[split, 1] ([0, 1] on r = t rows)
      tr_uniform=False,           # redraw (t, r) uniformly on a tenth of the rows
      lpips_weight=0.0,           # λ of the LPIPS-VGG16 term (0: off)
      convnext_weight=0.0,        # λ of the ConvNeXt-V2 logits term (0: off)
      perceptual_max_t=0.8,       # the perceptual terms only where t < perceptual_max_t
  ))


RULES = {
    **imf.RULES,
    "tr_uniform": boolean(),
    "lpips_weight": number(0),
    "convnext_weight": number(0),
    "perceptual_max_t": number(0, 1, low_open=True),
}
del RULES["aux_v_head"]   # pMF always has the v head


@dataclasses.dataclass(frozen=True)
class Draws(imf.Draws):
  """iMF's draws (t, r, noise, labels, dropped, omega, t_min, t_max; imf.Draws) and `crop`, the
  key of the perceptual terms' random resized crop."""

  crop: jax.Array


jax.tree_util.register_dataclass(
    Draws, data_fields=[field.name for field in dataclasses.fields(Draws)], meta_fields=[])


def sample_times(rng, batch_size, config):
  """(t, r), [B] each, in pMF's order: two draws of p(t) (flow.sample_time); with tr_uniform,
  both replaced by U[0, 1) draws on a UNIFORM_SHARE of the rows; then r = t on the layout's rows;
  then t, r = max, min."""
  cfg, options = config.objective, config.objective.pmf
  rng_t, rng_r, rng_uniform = jax.random.split(rng, 3)
  t = flow.sample_time(rng_t, batch_size, cfg)
  r = flow.sample_time(rng_r, batch_size, cfg)
  if options.tr_uniform:
    rng_rows, rng_t, rng_r = jax.random.split(rng_uniform, 3)
    uniform = jax.random.uniform(rng_rows, (batch_size,), jnp.float32) < UNIFORM_SHARE
    t = jnp.where(uniform, jax.random.uniform(rng_t, (batch_size,), jnp.float32), t)
    r = jnp.where(uniform, jax.random.uniform(rng_r, (batch_size,), jnp.float32), r)
  r = jnp.where(meanflow.r_equals_t_rows(batch_size, options.share_r_equals_t), t, r)
  return jnp.maximum(t, r), jnp.minimum(t, r)


def draw(rng, x, labels, config) -> Draws:
  """The draws of one batch (x: [B, ...] data, labels: [B]): times, noise, interval, ω,
  dropped rows (the r = t rows first, meanflow.dropped_rows) and the crop key."""
  cfg, options = config.objective, config.objective.pmf
  rng_time, rng_noise, rng_interval, rng_omega, rng_drop, rng_crop = jax.random.split(rng, 6)
  batch_size = x.shape[0]
  t, r = sample_times(rng_time, batch_size, config)
  noise = cfg.noise_std * jax.random.normal(rng_noise, x.shape, jnp.float32)
  equal = meanflow.r_equals_t_rows(batch_size, options.share_r_equals_t)
  t_min, t_max = imf.sample_interval(rng_interval, equal, options.interval_split)
  omega = imf.sample_omega(rng_omega, batch_size, options.s_max, options.cfg_beta)
  dropped = meanflow.dropped_rows(rng_drop, batch_size, cfg.label_dropout,
                                  options.share_r_equals_t)
  labels_in = jnp.where(dropped, config.data.num_classes, labels)
  return Draws(t, r, noise, labels_in, dropped, omega, t_min, t_max, rng_crop)


def perceptual_weights(config) -> dict:
  """{name: λ} of the perceptual terms that are on (objective.pmf.<name>_weight > 0)."""
  options = config.objective.pmf
  return {name: options[f"{name}_weight"] for name in PERCEPTUAL
          if options[f"{name}_weight"] > 0}


def make_example_losses(config, apply_fn, distance=None):
  """example_losses(net_params, x, labels, draws, frozen=None) -> {'loss', 'error_u', 'error_v'}
  and, with perceptual terms, {'lpips', 'convnext'} (the masked raw distances): [B]; 'compound'
  (V), 'guided' (v_g) and 'x_hat' (z_t - t·u), each x's shape.

  x: [B, ...] data, labels: [B] the true labels (v_c's), draws: `Draws`. distance(frozen, key,
  x_hat, x) -> {'lpips': [B], 'convnext': [B]}, the per-example perceptual distances on the
  crop `key` (perceptual.distances in `build`; tests inject a closed form); needed only when a
  perceptual weight is > 0. frozen: the feature networks' weights, as the trainer hands them.
  """
  cfg = config.objective
  options = cfg.pmf
  step = imf.make_step(config, apply_fn, options, aux=True)
  weights = perceptual_weights(config)
  t_floor = config.model.t_floor
  if weights and distance is None:
    raise ValueError(f"objective.pmf perceptual weights {weights}: the loss needs a distance")
  time = lambda a, like: parameterization.broadcast_time(a, like)

  def example_losses(net_params, x, labels, draws: Draws, frozen=None):
    t = draws.t
    z = parameterization.interpolate(x, draws.noise, t, schedules.get(cfg.schedule))
    v_t = (z - x) / time(jnp.clip(t, t_floor, 1.0), x)
    u, big_v, v_head, v_g = step(net_params, z, v_t, labels, draws)
    losses = imf.velocity_losses(big_v, v_head, v_g, options, aux=True)
    x_hat = z - time(t, u) * u
    losses["x_hat"] = x_hat
    if weights:
      distances = distance(frozen, draws.crop, x_hat, x)
      for name, lambda_ in weights.items():
        losses[name] = jnp.where(t < options.perceptual_max_t, distances[name], 0.0)
        losses["loss"] = losses["loss"] + lambda_ * meanflow.adaptive_weighting(
            losses[name], options.adaptive_p, options.adaptive_c)
    return losses

  return example_losses


def check(config) -> None:
  """Fail before compiling on settings pMF cannot train with."""
  imf.check_guided(config, "pmf", "pmf_dit", "trains an x-predicting network with guidance inputs")


def describe(config) -> imf.GuidedAverageVelocity:
  """The trained network: iMF's guided average velocity (its conversion from x-predictions is
  inside the network). Sampling takes any ω >= 1: the official evaluation samples above the
  trained range (B/16: ω = 8.5 > 1 + s_max = 8), where the network reads 1 - 1/ω, a short way
  past its training inputs; the interval stays within the trained one."""
  options = config.objective.pmf
  return imf.GuidedAverageVelocity(schedules.get(config.objective.schedule), s_max=math.inf,
                                   interval_split=options.interval_split, section="pmf")


def _without_feature_nets(config):
  """The distance of an objective built without its feature nets (for sampling or export, where
  the loss never runs): it refuses to run."""
  def distance(*args):
    del args
    raise ValueError(f"objective.pmf perceptual weights {perceptual_weights(config)}: the loss "
                     "needs the feature nets: build it with objectives.build(config, apply_fn, "
                     "feature_nets=kdiff_jax.perceptual) (train_state.setup does)")
  return distance


def build(config, apply_fn, feature_nets=None):
  """The objective. With perceptual terms, feature_nets is kdiff_jax.perceptual (handed in by
  train_state.setup: this package may not import it, since it reaches the models): the distance
  is its distances(frozen, config, key, x_hat, x), and the objective's `frozen` its loader, whose
  weights the trainer hands to the loss as `frozen=`."""
  check(config)
  metrics = ("error_u", "error_v") + tuple(perceptual_weights(config))
  distance = frozen = None
  if perceptual_weights(config) and feature_nets is None:
    distance = _without_feature_nets(config)
  elif perceptual_weights(config):
    distance = lambda frozen, key, x_hat, x: feature_nets.distances(frozen, config, key, x_hat, x)
    frozen = feature_nets.loader(config)
  example_losses = make_example_losses(config, apply_fn, distance)
  return dict(meanflow.objective(config, draw, example_losses, metrics, describe(config)),
              frozen=frozen)

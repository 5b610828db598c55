"""k-Diff: a learnable prediction target (Jin & Wang 2026, arXiv 2601.21419; docs/objectives/kdiff.md).

The network predicts u = k·x - (1-k)·n, a point on the line between data and noise, with
k = sigmoid(w_k) and w_k one scalar trained by backprop with the network. On rectified flow
(x_t = (1-t)·x + t·n, t = 0 data; the paper's z = t'·x + (1-t')·n with t' = 1 - t) the
prediction is converted to a velocity and scored there (docs/objectives/kdiff.md, "The loss"):

  Delta = k·t + (1-k)·(1-t)
  v_hat = ((2k-1)·x_t - u_hat) / max(Delta, m)                    (parameterization 'u_k')
  v     = (n - x)·Delta_bar / max(Delta_bar, m),  Delta_bar from stop_gradient(k)
  loss  = E ||v_hat - v||^2  =  E ||u_hat - u||^2 / max(Delta, m)^2

m = objective.min_divisor (0.05 in the k-Diff and JiT recipes). The target is
flow.regression_loss's converted true u under stop_gradient, so k cannot lower the loss by
rescaling its own target; where the clamp is off the target is n - x for every k.
k = 1 is JiT's x-prediction (with JiT's clamp), k = 0 is -eps-prediction, k = 1/2 is
velocity prediction with the output scaled by -1/2 (v_hat = -2·u_hat): with
objective.kdiff.learnable = False the eps / v / x baselines are this same code at a fixed k.
objective.prediction and objective.loss_target are not read (they are 'u_k' and 'velocity').

Options (objective.kdiff): k_init (the paper starts at k = 1/2 [R]); learnable;
w_k_scale s: k = sigmoid(s·w_k), w_k initialised at logit(k_init)/s. Under Adam w_k moves by
about the learning rate per step whatever its gradient's scale, so s multiplies the speed of
k's logit (1 = the paper's same-lr recipe [R]; short CPU runs use more: the gradient on w_k is
noisy, and k otherwise barely leaves 1/2 in a few thousand steps). time_dependent:
k(t) = sigmoid(s·((1-t)·w_k[0] + t·w_k[1])), the logit linear in t (the paper's ablation found
it worse than one k; off by default).

w_k lives in params next to params['net'] (Objective.extra_params): the trainer's AdamW
updates it with the network's learning rate and never decays it (the decay mask is ndim >= 2),
and the EMA tracks it. The trained network is a flow.Denoiser with prediction 'u_k' whose k is
read from the parameters being sampled (the EMA ones), k(params, t).
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdiff_jax import parameterization, schedules
from kdiff_jax.objectives import flow
from kdiff_jax.rules import boolean, number


def defaults():
  """objective.kdiff (docs/objectives/kdiff.md): u = k·x - (1-k)·n scored as a velocity with the
  clamp objective.min_divisor (0.05); k = sigmoid(w_k), w_k trained with the net (no decay, in
  the EMA)."""
  return ml_collections.ConfigDict(dict(
      learnable=True,             # False: k fixed at k_init (0 = eps, 0.5 = v, 1 = x baselines)
      k_init=0.5,                 # learnable: k_init in (0, 1)
      w_k_scale=1.0,              # k = sigmoid(w_k_scale·w_k): multiplies the speed of k under Adam
      time_dependent=False,       # k(t): logit linear in t, w_k of shape [2] (worse in the paper)
  ))


RULES = {
    "learnable": boolean(),
    "k_init": number(0, 1),
    "w_k_scale": number(0, low_open=True),
    "time_dependent": boolean(),
}


def k_of(params, t, kdiff_config):
  """k (a scalar) or k(t) ([B], time_dependent) from params['w_k']; the fixed k_init if frozen."""
  if not kdiff_config.learnable:
    return jnp.float32(kdiff_config.k_init)
  if kdiff_config.time_dependent:
    logit = kdiff_config.w_k_scale * params["w_k"]
    return jax.nn.sigmoid((1.0 - t) * logit[0] + t * logit[1])
  return parameterization.k_of_logit(params["w_k"], kdiff_config.w_k_scale)


def initial_params(kdiff_config):
  """{'w_k': logit(k_init)/w_k_scale} (shape [] or [2] for k(t)); {} when k is frozen."""
  if not kdiff_config.learnable:
    return {}
  w_k = parameterization.logit_of_k(kdiff_config.k_init, kdiff_config.w_k_scale)
  shape = (2,) if kdiff_config.time_dependent else ()
  return {"w_k": jnp.full(shape, w_k, jnp.float32)}


def per_example_loss(output, x, n, x_t, t, k, schedule, min_divisor):
  """||v_hat(u_hat, k) - stop_gradient(v(k))||^2 per example.

  flow.regression_loss with prediction 'u_k' scored in 'velocity' space, clamp min_divisor.
  """
  return flow.regression_loss(output, x, n, x_t, t, schedule, prediction="u_k",
                              loss_target="velocity", k=k, min_divisor=min_divisor)


def check(config):
  """k_init must give a finite w_k when learnable; k(t) needs a learnable k."""
  cfg = config.objective.kdiff
  if cfg.learnable and not 0.0 < cfg.k_init < 1.0:
    raise ValueError(f"objective.kdiff.k_init={cfg.k_init!r}: must be in (0, 1) when "
                     "objective.kdiff.learnable (w_k = logit(k_init)); [0, 1] when frozen")
  if cfg.time_dependent and not cfg.learnable:
    raise ValueError("objective.kdiff.time_dependent=True needs objective.kdiff.learnable=True")


@dataclasses.dataclass(frozen=True)
class LearnedK(flow.Denoiser):
  """A u_k denoiser (flow.Denoiser with prediction 'u_k'), whose export also carries k."""

  time_dependent: bool = False

  def export(self, config, params_by_weights) -> dict:
    """prediction, and k of each weights ({'model': raw, 'ema': EMA params}) as the objective
    computes it: a float, or for a time-dependent k its values at t = 0 and t = 1 (its logit is
    linear in t)."""
    t = np.array([0.0, 1.0]) if self.time_dependent else None
    k_of_weights = lambda params: np.asarray(self.k(params, t), np.float64).tolist()
    return dict(super().export(config, params_by_weights),
                kdiff=dict(time_dependent=self.time_dependent,
                           k={name: k_of_weights(params)
                              for name, params in params_by_weights.items()}))


def describe(config) -> LearnedK:
  """A u_k denoiser with k = k_of(params, t), scored with the loss's clamp objective.min_divisor."""
  cfg = config.objective
  return LearnedK(schedules.get(cfg.schedule), "u_k", noise_std=cfg.noise_std,
                  min_divisor=cfg.min_divisor, k=lambda params, t: k_of(params, t, cfg.kdiff),
                  time_dependent=cfg.kdiff.time_dependent)


def build(config, apply_fn):
  cfg = config.objective
  kd = cfg.kdiff
  check(config)
  schedule = schedules.get(cfg.schedule)

  def loss(params, batch, rng):
    x, n, t, x_t, labels = flow.noised_batch(batch, rng, config, schedule)
    output = apply_fn(params["net"], x_t, t, labels,
                      **flow.dropout_kwargs(rng, config)).astype(jnp.float32)
    k = k_of(params, t, kd)
    value = jnp.mean(per_example_loss(output, x, n, x_t, t, k, schedule, cfg.min_divisor))
    metrics = {"loss": value, "k": jnp.mean(k)}
    if kd.time_dependent:
      metrics.update(k_data=k_of(params, 0.0, kd), k_noise=k_of(params, 1.0, kd))
    return value, metrics

  return dict(loss=loss, description=describe(config), extra_params=initial_params(kd))

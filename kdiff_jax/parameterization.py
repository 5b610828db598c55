"""The interchangeable network parameterizations, for any schedule (docs/parameterization.md).

Given x_t = alpha·x + sigma·n (n ~ N(0, noise_std^2 I)), a network output in one of

  eps       n                                   (noise; Ho et al. 2020)
  x         x                                   (data)
  v         alpha·n - sigma·x                   (Salimans & Ho 2022)
  velocity  alpha_dot·x + sigma_dot·n           (flow matching; = n - x for rectified flow)
  score     -n / (sigma·noise_std^2)            (grad log p_t(x_t) at the posterior mean)
  u_k       k·x - (1 - k)·n                     (k-Diff, Jin & Wang 2026)

is turned into (x_hat, n_hat) by `to_x_eps`, and (x, n) into any target by `from_x_eps`.
Every sampler and objective goes through these two functions; nothing else re-derives them.

Divisors that vanish at an endpoint (sigma for x at t = 0, alpha for eps at alpha = 0, Delta for
u_k) can be clamped from below with `min_divisor` (JiT and k-Diff use 0.05).
"""
import math

import jax
import jax.numpy as jnp

PREDICTIONS = ("eps", "x", "v", "velocity", "score", "u_k")


def check_prediction(prediction: str, field: str = "objective.prediction") -> str:
  if prediction not in PREDICTIONS:
    raise ValueError(f"{field}={prediction!r}: allowed values are {list(PREDICTIONS)}")
  return prediction


def broadcast_time(t, x):
  """Reshape a per-example time [B] (or a scalar) to broadcast against x [B, ...]."""
  t = jnp.asarray(t)
  return t.reshape(t.shape + (1,) * (jnp.ndim(x) - t.ndim)) if t.ndim else t


def _clamp(divisor, min_divisor):
  return jnp.maximum(divisor, min_divisor) if min_divisor else divisor


def _coefficients(t, x, schedule):
  t = broadcast_time(t, x)
  return (schedule.alpha(t), schedule.sigma(t), schedule.alpha_dot(t), schedule.sigma_dot(t))


def to_x_eps(prediction, output, x_t, t, schedule, *, k=None, noise_std=1.0, min_divisor=0.0):
  """(x_hat, n_hat) from a network `output` in parameterization `prediction` at (x_t, t).

  eps:      x = (x_t - sigma·eps)/alpha
  x:        n = (x_t - alpha·x)/sigma
  v:        x = (alpha·x_t - sigma·v)/(alpha^2 + sigma^2),  n = (sigma·x_t + alpha·v)/(alpha^2 + sigma^2)
  velocity: x = (sigma_dot·x_t - sigma·u)/(alpha·sigma_dot - sigma·alpha_dot),
            n = (alpha·u - alpha_dot·x_t)/(alpha·sigma_dot - sigma·alpha_dot)
  score:    n = -sigma·noise_std^2·s,  x = (x_t - sigma·n)/alpha
  u_k:      x = ((1-k)·x_t + sigma·u)/Delta,  n = (k·x_t - alpha·u)/Delta,  Delta = alpha(1-k) + sigma·k
  """
  check_prediction(prediction, "prediction")
  alpha, sigma, alpha_dot, sigma_dot = _coefficients(t, x_t, schedule)
  if prediction == "eps":
    n_hat = output
    return (x_t - sigma * n_hat) / _clamp(alpha, min_divisor), n_hat
  if prediction == "x":
    return output, (x_t - alpha * output) / _clamp(sigma, min_divisor)
  if prediction == "v":
    norm = alpha**2 + sigma**2
    return (alpha * x_t - sigma * output) / norm, (sigma * x_t + alpha * output) / norm
  if prediction == "velocity":
    det = _clamp(alpha * sigma_dot - sigma * alpha_dot, min_divisor)
    return (sigma_dot * x_t - sigma * output) / det, (alpha * output - alpha_dot * x_t) / det
  if prediction == "score":
    n_hat = -sigma * noise_std**2 * output
    return (x_t - sigma * n_hat) / _clamp(alpha, min_divisor), n_hat
  k = _check_k(k, x_t)
  delta = _clamp(alpha * (1.0 - k) + sigma * k, min_divisor)
  return ((1.0 - k) * x_t + sigma * output) / delta, (k * x_t - alpha * output) / delta


def from_x_eps(prediction, x, n, t, schedule, *, k=None, noise_std=1.0):
  """The target of parameterization `prediction` for data x and noise n at time t."""
  check_prediction(prediction, "prediction")
  alpha, sigma, alpha_dot, sigma_dot = _coefficients(t, x, schedule)
  if prediction == "eps":
    return n
  if prediction == "x":
    return x
  if prediction == "v":
    return alpha * n - sigma * x
  if prediction == "velocity":
    return alpha_dot * x + sigma_dot * n
  if prediction == "score":
    return -n / (sigma * noise_std**2)
  k = _check_k(k, x)
  return k * x - (1.0 - k) * n


def convert(output, x_t, t, schedule, *, source, target, k=None, noise_std=1.0, min_divisor=0.0):
  """Re-express a `source` prediction at (x_t, t) as a `target` prediction."""
  if source == target:
    return output
  x_hat, n_hat = to_x_eps(source, output, x_t, t, schedule, k=k, noise_std=noise_std,
                          min_divisor=min_divisor)
  return from_x_eps(target, x_hat, n_hat, t, schedule, k=k, noise_std=noise_std)


def interpolate(x, n, t, schedule):
  """x_t = alpha_t·x + sigma_t·n."""
  t = broadcast_time(t, x)
  return schedule.alpha(t) * x + schedule.sigma(t) * n


def ddim(x_t, x, s, t, schedule):
  """DDIM interpolant DDIM(x_t, x, s, t) = (alpha_s - alpha_t·sigma_s/sigma_t)·x + (sigma_s/sigma_t)·x_t.

  The point at time s on the line through x_t with data estimate x (Song et al. 2021, Eq. 12;
  IMM, Zhou et al. 2025, Eq. 11): x_s = alpha_s·x + sigma_s·n_hat with n_hat = (x_t - alpha_t·x)/sigma_t.
  DDIM(x_t, x, t, t) = x_t, DDIM(x_t, x, 0, t) = x, and it is self-consistent:
  DDIM(DDIM(x_t, x, r, t), x, s, r) = DDIM(x_t, x, s, t).
  """
  s, t = broadcast_time(s, x_t), broadcast_time(t, x_t)
  ratio = schedule.sigma(s) / schedule.sigma(t)
  return (schedule.alpha(s) - schedule.alpha(t) * ratio) * x + ratio * x_t


def k_of_logit(w_k, scale: float = 1.0):
  """k-Diff's k = sigmoid(scale·w_k) (Jin & Wang 2026): w_k is trained, k stays in (0, 1)."""
  return jax.nn.sigmoid(scale * w_k)


def logit_of_k(k: float, scale: float = 1.0) -> float:
  """The w_k that gives k (k_of_logit's inverse): logit(k)/scale, k in (0, 1)."""
  return math.log(k / (1.0 - k)) / scale


def _check_k(k, x):
  """k is a scalar or per-example [B] (a time-dependent k(t))."""
  if k is None:
    raise ValueError("prediction='u_k' needs k (k-Diff's k = sigmoid(w_k))")
  return broadcast_time(k, x)

"""Interpolant schedules x_t = alpha(t)·x + sigma(t)·n, with t = 0 data and t = 1 noise.

One convention for the whole codebase (docs/parameterization.md). Every schedule gives
alpha, sigma, their time derivatives, lambda = log(alpha/sigma), eta = sigma/alpha and the
inverse of eta. The functions are written for both NumPy and JAX: NumPy inputs (floats or
ndarrays) are evaluated in float64 on the host (samplers precompute coefficients that way),
JAX inputs stay JAX arrays of their own dtype (float32 in training).
"""
import dataclasses
import math

import jax.numpy as jnp
import numpy as np


def _xp(t):
  """NumPy for host values, jax.numpy for traced / device arrays."""
  return np if isinstance(t, (float, int, np.ndarray, np.floating, np.integer)) else jnp


class Schedule:
  """Base class: subclasses define alpha, sigma, alpha_dot, sigma_dot (and may override eta_inv)."""

  name: str

  def alpha(self, t):
    raise NotImplementedError

  def sigma(self, t):
    raise NotImplementedError

  def alpha_dot(self, t):
    raise NotImplementedError

  def sigma_dot(self, t):
    raise NotImplementedError

  def lambda_(self, t):
    """lambda = log(alpha/sigma), half the log-SNR."""
    xp = _xp(t)
    return xp.log(self.alpha(t)) - xp.log(self.sigma(t))

  def lambda_dot(self, t):
    """d lambda / dt = alpha_dot/alpha - sigma_dot/sigma."""
    return self.alpha_dot(t) / self.alpha(t) - self.sigma_dot(t) / self.sigma(t)

  def eta(self, t):
    """eta = sigma/alpha, the noise-to-signal ratio (IMM's and DDIM's time variable)."""
    return self.sigma(t) / self.alpha(t)

  def eta_inv(self, eta):
    """The time t with eta(t) = eta (eta is increasing in t)."""
    raise NotImplementedError

  def lambda_inv(self, lambda_):
    """The time t with lambda(t) = lambda_; eta = exp(-lambda)."""
    return self.eta_inv(_xp(lambda_).exp(-lambda_))

  def network_time(self, t):
    """The time the network is conditioned on at t (its embedder sees model.time_scale times
    this): t itself, except for DDPM's discrete schedule (VP.network_time)."""
    return t


@dataclasses.dataclass(frozen=True)
class RectifiedFlow(Schedule):
  """OT flow matching / rectified flow: alpha = 1 - t, sigma = t (Lipman et al. 2023; Liu et al. 2023)."""

  name: str = "rectified_flow"

  def alpha(self, t):
    return 1.0 - t

  def sigma(self, t):
    return t

  def alpha_dot(self, t):
    return -_xp(t).ones_like(t)

  def sigma_dot(self, t):
    return _xp(t).ones_like(t)

  def eta_inv(self, eta):
    """eta = t/(1 - t)  =>  t = eta/(1 + eta)."""
    return eta / (1.0 + eta)


@dataclasses.dataclass(frozen=True)
class Cosine(Schedule):
  """Cosine / TrigFlow: alpha = cos(pi t/2), sigma = sin(pi t/2) (Nichol & Dhariwal 2021; Lu & Song 2024)."""

  name: str = "cosine"

  def alpha(self, t):
    return _xp(t).cos(0.5 * math.pi * t)

  def sigma(self, t):
    return _xp(t).sin(0.5 * math.pi * t)

  def alpha_dot(self, t):
    return -0.5 * math.pi * _xp(t).sin(0.5 * math.pi * t)

  def sigma_dot(self, t):
    return 0.5 * math.pi * _xp(t).cos(0.5 * math.pi * t)

  def eta_inv(self, eta):
    """eta = tan(pi t/2)  =>  t = 2·arctan(eta)/pi."""
    return 2.0 / math.pi * _xp(eta).arctan(eta)


@dataclasses.dataclass(frozen=True)
class VP(Schedule):
  """Variance preserving with the DDPM discrete beta table (Ho et al. 2020), in continuous time.

  DDPM: beta_i linear from beta_start to beta_end over i = 1..N, alphabar_i = prod_{j<=i}(1 - beta_j),
  alpha = sqrt(alphabar), sigma = sqrt(1 - alphabar). Step i sits at t_i = i/N and t = 0 is clean
  data (alpha = 1). log(alpha) is interpolated piecewise linearly in t between the knots, as
  DPM-Solver's discrete NoiseScheduleVP does (Lu et al. 2022, App. D), so alpha_dot is the
  slope of that interpolant and sigma = sqrt(1 - alpha^2) exactly.
  """

  name: str = "vp"
  beta_start: float = 1e-4
  beta_end: float = 0.02
  num_steps: int = 1000

  @property
  def _knots(self):
    betas = np.linspace(self.beta_start, self.beta_end, self.num_steps, dtype=np.float64)
    log_alpha = np.concatenate([[0.0], 0.5 * np.cumsum(np.log1p(-betas))])
    t = np.arange(self.num_steps + 1, dtype=np.float64) / self.num_steps
    return t, log_alpha

  def log_alpha(self, t):
    xp = _xp(t)
    knots_t, knots_log_alpha = self._knots
    dtype = np.float64 if xp is np else jnp.result_type(t, jnp.float32)
    return xp.interp(t, knots_t.astype(dtype), knots_log_alpha.astype(dtype))

  def _slope(self, t):
    xp = _xp(t)
    knots_t, knots_log_alpha = self._knots
    slopes = np.diff(knots_log_alpha) * self.num_steps
    index = xp.clip(xp.floor(t * self.num_steps).astype(np.int32), 0, self.num_steps - 1)
    dtype = np.float64 if xp is np else jnp.result_type(t, jnp.float32)
    return xp.asarray(slopes.astype(dtype))[index]

  def alpha(self, t):
    return _xp(t).exp(self.log_alpha(t))

  def sigma(self, t):
    xp = _xp(t)
    return xp.sqrt(-xp.expm1(2.0 * self.log_alpha(t)))

  def alpha_dot(self, t):
    return self.alpha(t) * self._slope(t)

  def sigma_dot(self, t):
    """sigma = sqrt(1 - alpha^2)  =>  sigma_dot = -alpha·alpha_dot/sigma."""
    return -self.alpha(t) * self.alpha_dot(t) / self.sigma(t)

  def network_time(self, t):
    """DDPM's step index over N: t - 1/N.

    DDPM (and DiT, and every network trained with its code) noises step k = 0..N-1 to
    alphabar_k = prod_{j<=k}(1 - beta_j) and embeds k; this schedule puts alphabar_k at the knot
    t = (k + 1)/N (t = 0 is clean data). So the network sees t - 1/N = k/N, and with
    model.time_scale = N its embedder gets k exactly: a DiT imported from PyTorch samples at the
    noise level it was trained at, and an exported VP model runs in DiT's own diffusion code.
    """
    return t - 1.0 / self.num_steps

  def eta_inv(self, eta):
    """Invert log(alpha) = -0.5·log(1 + eta^2) on the piecewise-linear knots."""
    xp = _xp(eta)
    knots_t, knots_log_alpha = self._knots
    target = -0.5 * xp.log1p(eta * eta)
    dtype = np.float64 if xp is np else jnp.result_type(eta, jnp.float32)
    # log_alpha decreases in t; interp needs increasing x, so flip the sign.
    return xp.interp(-target, (-knots_log_alpha).astype(dtype), knots_t.astype(dtype))


SCHEDULES = {"rectified_flow": RectifiedFlow, "cosine": Cosine, "vp": VP}


def get(name: str) -> Schedule:
  """The schedule called `name` (objective.schedule in the config)."""
  if name not in SCHEDULES:
    raise ValueError(f"objective.schedule={name!r}: allowed values are {sorted(SCHEDULES)}")
  return SCHEDULES[name]()

"""Sampling an exported model in PyTorch without JAX: the twin of kdiff_jax/schedules.py,
parameterization.to_x_eps and the samplers an export names.

  Schedule       x_t = alpha(t)·x + sigma(t)·n at host float64 times (rectified_flow, cosine, vp)
  to_x_eps       (x_hat, n_hat) from a network output in any prediction (eps, x, v, velocity,
                 score, k-Diff's u_k)
  sample_ode     Euler / Heun in t on the probability-flow velocity (flow matching, k-Diff)
  sample_imm     IMM's pushforward x <- f_{s,t}(x)
  sample_mean_flow  MeanFlow's z <- z - (t - r)·u (iMF's with ω and the interval as inputs)
  sample_tvm     TVM's x <- x + (s - t)·a·F(x, t, t - s, y, beta = 1/cfg)
  sample         the one an export names (SAMPLERS, by its JSON's objective.torch_sampler),
                 with its settings (its JSON's 'sampling' and 'objective')

The network sees `Schedule.network_time(t)` and classifier-free guidance with the null label
(conventions in torch_dit.py). torch and numpy only, no JAX.
"""
import math
from typing import Callable

import numpy as np
import torch


# --- schedules and parameterizations (kdiff_jax's conventions: t = 0 data, t = 1 noise) -----------

class Schedule:
  """x_t = alpha(t)·x + sigma(t)·n at host float times (float64), as kdiff_jax.schedules.

  rectified_flow: alpha = 1 - t, sigma = t.  cosine: alpha = cos(πt/2), sigma = sin(πt/2).
  vp: DDPM's linear beta table (1e-4 .. 0.02, 1000 steps), log(alpha) linear between the knots
  t_i = i/1000, sigma = sqrt(1 - alpha²).
  """

  NAMES = ("rectified_flow", "cosine", "vp")

  def __init__(self, name: str):
    if name not in self.NAMES:
      raise ValueError(f"schedule {name!r}: allowed values are {list(self.NAMES)}")
    self.name = name
    if name == "vp":
      betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
      self._log_alpha = np.concatenate([[0.0], 0.5 * np.cumsum(np.log1p(-betas))])
      self._knots = np.arange(1001, dtype=np.float64) / 1000

  def alpha(self, t: float) -> float:
    if self.name == "rectified_flow":
      return 1.0 - t
    if self.name == "cosine":
      return math.cos(0.5 * math.pi * t)
    return math.exp(float(np.interp(t, self._knots, self._log_alpha)))

  def sigma(self, t: float) -> float:
    if self.name == "rectified_flow":
      return t
    if self.name == "cosine":
      return math.sin(0.5 * math.pi * t)
    return math.sqrt(-math.expm1(2.0 * math.log(self.alpha(t))))

  def alpha_dot(self, t: float) -> float:
    if self.name == "rectified_flow":
      return -1.0
    if self.name == "cosine":
      return -0.5 * math.pi * math.sin(0.5 * math.pi * t)
    i = min(max(int(math.floor(t * 1000)), 0), 999)
    return self.alpha(t) * (self._log_alpha[i + 1] - self._log_alpha[i]) * 1000

  def sigma_dot(self, t: float) -> float:
    if self.name == "rectified_flow":
      return 1.0
    if self.name == "cosine":
      return 0.5 * math.pi * math.cos(0.5 * math.pi * t)
    return -self.alpha(t) * self.alpha_dot(t) / self.sigma(t)

  def network_time(self, t: float) -> float:
    """The time the network is given at t: t, or on vp t - 1/1000, so that a DiT's embedder
    (time_scale 1000) sees DDPM's step index k where alpha² = alphabar_k."""
    return t - 1e-3 if self.name == "vp" else t


def to_x_eps(prediction: str, output, x_t, t: float, schedule: Schedule, *, k=None,
             noise_std: float = 1.0, min_divisor: float = 0.0):
  """(x_hat, n_hat) from a network output in `prediction` (kdiff_jax.parameterization.to_x_eps);
  t a host float, or on rectified_flow a tensor that broadcasts against x_t (pMF's per-example
  conversion, torch_pmf_dit.py).

  eps: x = (x_t - sigma·eps)/alpha.  x: n = (x_t - alpha·x)/sigma.
  v: x = (alpha·x_t - sigma·v)/(alpha² + sigma²),  n = (sigma·x_t + alpha·v)/(alpha² + sigma²).
  velocity: x = (sigma_dot·x_t - sigma·u)/det, n = (alpha·u - alpha_dot·x_t)/det,
            det = alpha·sigma_dot - sigma·alpha_dot.
  score: n = -sigma·noise_std²·s, x = (x_t - sigma·n)/alpha.
  u_k: x = ((1-k)·x_t + sigma·u)/Delta, n = (k·x_t - alpha·u)/Delta,
       Delta = alpha·(1-k) + sigma·k.
  Divisors that vanish at an end are clamped from below by min_divisor (if > 0).
  """
  alpha, sigma = schedule.alpha(t), schedule.sigma(t)
  clamp = lambda d: (d.clamp(min=min_divisor) if torch.is_tensor(d) else max(d, min_divisor)
                     ) if min_divisor else d
  if prediction in ("eps", "score"):
    n_hat = output if prediction == "eps" else -sigma * noise_std**2 * output
    return (x_t - sigma * n_hat) / clamp(alpha), n_hat
  if prediction == "x":
    return output, (x_t - alpha * output) / clamp(sigma)
  if prediction == "v":
    norm = alpha**2 + sigma**2
    return (alpha * x_t - sigma * output) / norm, (sigma * x_t + alpha * output) / norm
  if prediction == "velocity":
    alpha_dot, sigma_dot = schedule.alpha_dot(t), schedule.sigma_dot(t)
    det = clamp(alpha * sigma_dot - sigma * alpha_dot)
    return (sigma_dot * x_t - sigma * output) / det, (alpha * output - alpha_dot * x_t) / det
  if prediction == "u_k":
    delta = clamp(alpha * (1.0 - k) + sigma * k)
    return ((1.0 - k) * x_t + sigma * output) / delta, (k * x_t - alpha * output) / delta
  raise ValueError(f"prediction {prediction!r}: allowed values are "
                   "['eps', 'x', 'v', 'velocity', 'score', 'u_k']")


# --- samplers -------------------------------------------------------------------------------------

def _guided(model, labels, schedule: Schedule, *, guidance_scale: float, guidance_interval,
            null_label: int):
  """net(x, t, s=None) -> G: the model at the schedule's network_time(t), with classifier-free
  guidance G_null + w·(G_cond - G_null) for t inside guidance_interval (inclusive), the
  conditional output elsewhere; t and s are host floats."""
  t_lo, t_hi = guidance_interval

  def net(x, t, s=None):
    batch = x.shape[0]
    time = lambda value: torch.full((batch,), value, dtype=torch.float32, device=x.device)
    t_vec = time(schedule.network_time(t))
    # The second time input: s, or a [B] tensor already (IMM's stride t - s in float32).
    s_vec = s if s is None or torch.is_tensor(s) else time(s)
    if guidance_scale == 1 or not t_lo <= t <= t_hi:
      return model(x, t_vec, labels, s_vec)
    both = lambda v: None if v is None else torch.cat([v, v])
    null = torch.full_like(labels, null_label)
    out = model(both(x), both(t_vec), torch.cat([labels, null]), both(s_vec))
    cond, uncond = out[:batch], out[batch:]
    return uncond + guidance_scale * (cond - uncond)

  return net


def uniform_times(num_steps: int, t_start: float = 1.0, t_end: float = 0.0) -> list[float]:
  return np.linspace(t_start, t_end, num_steps + 1).tolist()


@torch.no_grad()
def sample_ode(model, noise, labels, times, *, method: str = "heun",
               schedule: str = "rectified_flow", prediction: str = "velocity",
               k: float | Callable[[float], float] | None = None, noise_std: float = 1.0,
               min_divisor: float = 0.0, guidance_scale: float = 1.0,
               guidance_interval=(0.0, 1.0), null_label: int):
  """Flow Euler / Heun in t on the velocity v = alpha_dot·x_hat + sigma_dot·n_hat.

  From x = noise at times[0] (already scaled by noise_std) down the decreasing `times`:
  Euler x_s = x_t + (s - t)·v(x_t, t); Heun adds the trapezoid correction with v at the Euler
  point, and its last step is Euler (no model call at times[-1]). k: k-Diff's k, or k(t).
  """
  if method not in ("euler", "heun"):
    raise ValueError(f"method {method!r}: torch_sampling samples ODEs with 'euler' or 'heun'")
  schedule = Schedule(schedule)
  net = _guided(model, labels, schedule, guidance_scale=guidance_scale,
                guidance_interval=guidance_interval, null_label=null_label)

  def velocity(x, t):
    k_t = k(t) if callable(k) else k
    x_hat, n_hat = to_x_eps(prediction, net(x, t), x, t, schedule, k=k_t, noise_std=noise_std,
                            min_divisor=min_divisor)
    return schedule.alpha_dot(t) * x_hat + schedule.sigma_dot(t) * n_hat

  x = noise.float()
  steps = list(zip(times[:-1], times[1:]))
  for i, (t, s) in enumerate(steps):
    v = velocity(x, t)
    if method == "heun" and i < len(steps) - 1:
      x = x + (s - t) * 0.5 * (v + velocity(x + (s - t) * v, s))
    else:
      x = x + (s - t) * v
  return x


def imm_map_coefficients(f_type: str, s: float, t: float, schedule: Schedule, sigma_d: float):
  """(c_skip, c_out) of IMM's one-step map f_{s,t}(x_t) = c_skip·x_t + c_out·G (App. C.6).

  euler_fm: (1, -(t - s)·sigma_d).  simple_edm: ((alpha_t·alpha_s + sigma_t·sigma_s)/(alpha_t² +
  sigma_t²), -(alpha_s·sigma_t - alpha_t·sigma_s)/sqrt(alpha_t² + sigma_t²)·sigma_d).
  identity (DDIM with G as x): (sigma_s/sigma_t, alpha_s - alpha_t·sigma_s/sigma_t).
  """
  alpha_s, sigma_s = schedule.alpha(s), schedule.sigma(s)
  alpha_t, sigma_t = schedule.alpha(t), schedule.sigma(t)
  if f_type == "euler_fm":
    return 1.0, -(t - s) * sigma_d
  if f_type == "simple_edm":
    norm = alpha_t**2 + sigma_t**2
    return ((alpha_t * alpha_s + sigma_t * sigma_s) / norm,
            -(alpha_s * sigma_t - alpha_t * sigma_s) / math.sqrt(norm) * sigma_d)
  if f_type == "identity":
    return sigma_s / sigma_t, alpha_s - alpha_t * sigma_s / sigma_t
  raise ValueError(f"f_type {f_type!r}: allowed values are ['euler_fm', 'simple_edm', 'identity']")


@torch.no_grad()
def sample_imm(model, noise, labels, times, *, f_type: str = "euler_fm",
               schedule: str = "rectified_flow", sigma_d: float = 0.5,
               time_conditioning: str = "identity", guidance_scale: float = 1.0,
               guidance_interval=(0.0, 1.0), null_label: int):
  """IMM pushforward (Zhou, Ermon, Song 2025): x <- f_{t_{i+1}, t_i}(x) down the decreasing times.

  x starts at noise ~ sigma_d·N(0, I) at times[0]; the network sees c_in(t)·x_t with
  c_in = 1/(sigma_d·sqrt(alpha_t² + sigma_t²)), t, and s (time_conditioning 'identity') or t - s
  ('stride'); guidance acts on the raw output G before the map.
  """
  if time_conditioning not in ("identity", "stride"):
    raise ValueError(f"time_conditioning {time_conditioning!r}: 'identity' or 'stride'")
  schedule = Schedule(schedule)
  net = _guided(model, labels, schedule, guidance_scale=guidance_scale,
                guidance_interval=guidance_interval, null_label=null_label)
  x = noise.float()
  for t, s in zip(times[:-1], times[1:]):
    c_in = 1.0 / (sigma_d * math.sqrt(schedule.alpha(t)**2 + schedule.sigma(t)**2))
    if time_conditioning == "stride":  # t - s in float32, as the JAX sampler computes it
      as32 = lambda v: torch.full((x.shape[0],), v, dtype=torch.float32, device=x.device)
      second_time = as32(t) - as32(s)
    else:
      second_time = s
    output = net(c_in * x, t, second_time)
    c_skip, c_out = imm_map_coefficients(f_type, s, t, schedule, sigma_d)
    x = c_skip * x + c_out * output
  return x


@torch.no_grad()
def sample_mean_flow(model, noise, labels, times, **conditioning):
  """MeanFlow (Geng et al. 2025, Alg. 2): z <- z - (t - r)·u(z, t, h = t - r, y, **conditioning)
  down the decreasing times (one model call a step; guidance is trained into u). noise
  [N, C, H, W] at times[0]; t - r in float32, as the JAX sampler computes it."""
  z = noise.float()
  as32 = lambda value: torch.full((z.shape[0],), value, dtype=torch.float32, device=z.device)
  for t, r in zip(times[:-1], times[1:]):
    t_, r_ = as32(t), as32(r)
    z = z - (t_ - r_)[:, None, None, None] * model(z, t_, labels, t_ - r_, **conditioning)
  return z


@torch.no_grad()
def sample_tvm(model, noise, labels, times, *, cfg: float, scale_output: bool):
  """Terminal Velocity Matching (lumalabs/tvm `generate_images.py`): x <- x + (s - t)·a·F(x, t,
  h = t - s, y, guidance = beta) down the decreasing times, beta = 1/cfg, a = cfg with
  scale_output (else 1); guidance is trained into F, one model call a step."""
  if not cfg > 0:
    raise ValueError(f"guidance_scale={cfg}: TVM feeds beta = 1/cfg, so it must be > 0")
  x = noise.float()
  as32 = lambda value: torch.full((x.shape[0],), value, dtype=torch.float32, device=x.device)
  beta, a = as32(1.0 / cfg), float(cfg) if scale_output else 1.0
  for t, s in zip(times[:-1], times[1:]):
    t_, s_ = as32(t), as32(s)
    # (s - t)·a in float32 on the host value, as the JAX sampler's step (samplers/tvm.py)
    step = torch.tensor(np.float32(s) - np.float32(t), dtype=torch.float32) * a
    x = x + step * model(x, t_, labels, t_ - s_, guidance=beta)
  return x


def kdiff_k(objective_meta: dict, weights: str):
  """k-Diff's k for `weights` ('model' or 'ema'): a float, or k(t) = sigmoid((1-t)·logit(k_0) +
  t·logit(k_1)) for a time-dependent k (exported as [k_0, k_1]); None for other objectives."""
  kdiff = objective_meta.get("kdiff")
  if kdiff is None:
    return None
  k = kdiff["k"][weights]
  if not kdiff["time_dependent"]:
    return k
  logit_data, logit_noise = (math.log(k_end / (1.0 - k_end)) for k_end in k)
  return lambda t: 1.0 / (1.0 + math.exp(-((1.0 - t) * logit_data + t * logit_noise)))


# An export's sampler, by the name its JSON gives (meta['objective']['torch_sampler'], the
# description's `torch_sampler`): fn(model, meta, noise, labels, *, method, times,
# guidance_scale, weights) -> x at times[-1]. `register` adds one.
SAMPLERS = {}


def register(name: str, sampler: Callable) -> None:
  """Let `sample` run exports whose JSON names `name` with `sampler` (signature above)."""
  SAMPLERS[name] = sampler


def _only(method: str, allowed: str, objective: str) -> None:
  if method != allowed:
    raise ValueError(f"method {method!r}: torch_sampling samples {objective} models with "
                     f"{allowed!r}")


def _ode(model, meta, noise, labels, *, method, times, guidance_scale, weights):
  objective = meta["objective"]
  return sample_ode(model, noise, labels, times, method=method, schedule=objective["schedule"],
                    prediction=objective["prediction"],
                    k=kdiff_k(objective, weights or meta["weights"]["safetensors"]),
                    noise_std=objective["noise_std"], min_divisor=objective["min_divisor"],
                    guidance_scale=guidance_scale,
                    guidance_interval=tuple(meta["sampling"]["guidance_interval"]),
                    null_label=meta["model"]["num_classes"])


def _imm(model, meta, noise, labels, *, method, times, guidance_scale, weights):
  del weights
  objective = meta["objective"]
  _only(method, "pushforward", "IMM")
  return sample_imm(model, noise, labels, times, f_type=objective["imm"]["f_type"],
                    schedule=objective["schedule"], sigma_d=objective["noise_std"],
                    time_conditioning=objective["imm"]["time_conditioning"],
                    guidance_scale=guidance_scale,
                    guidance_interval=tuple(meta["sampling"]["guidance_interval"]),
                    null_label=meta["model"]["num_classes"])


def _mean_flow(model, meta, noise, labels, *, method, times, guidance_scale, weights):
  del weights, guidance_scale   # trained into u (MeanFlow's config refuses a sampling scale)
  _only(method, "mean_flow", "MeanFlow")
  return sample_mean_flow(model, noise, labels, times)


def _imf(model, meta, noise, labels, *, method, times, guidance_scale, weights):
  """iMF: the network takes ω = guidance_scale and the interval [t_min, t_max] as inputs."""
  del weights
  _only(method, "mean_flow", "iMF")
  return sample_mean_flow(model, noise, labels, times, guidance=guidance_scale,
                          interval=tuple(meta["sampling"]["guidance_interval"]))


def _tvm(model, meta, noise, labels, *, method, times, guidance_scale, weights):
  del weights
  _only(method, "tvm", "TVM")
  return sample_tvm(model, noise, labels, times, cfg=guidance_scale,
                    scale_output=meta["objective"]["tvm"]["scale_output"])


for _name, _sampler in (("ode", _ode), ("imm", _imm), ("mean_flow", _mean_flow), ("imf", _imf),
                        ("tvm", _tvm)):
  register(_name, _sampler)


def sample(model, meta: dict, noise, labels, *, method: str | None = None,
           num_steps: int | None = None, guidance_scale: float | None = None,
           weights: str | None = None):
  """Samples from an exported model with the export's sampler settings (meta['sampling']).

  noise: [N, C, H, W] at t_start, already scaled by meta['objective']['noise_std']; labels [N].
  The sampler is the one the export names (meta['objective']['torch_sampler'], `SAMPLERS`); an
  objective without one is refused by name. method: 'euler' / 'heun' (flow, k-Diff),
  'pushforward' (IMM), 'mean_flow' (MeanFlow, iMF) or 'tvm' (TVM); num_steps: a uniform grid in
  t from t_start to t_end instead of the exported grid; guidance_scale: classifier-free
  guidance, iMF's ω or TVM's cfg (β = 1/cfg); weights: which weights `model` holds, 'ema' or
  'model' (k-Diff's learned k differs), default that of the .safetensors.
  """
  objective, sampling = meta["objective"], meta["sampling"]
  name = objective.get("torch_sampler")
  if name not in SAMPLERS:
    raise ValueError(
        f"objective {objective['name']!r}: no PyTorch sampler " +
        (f"named {name!r} is registered (torch_sampling.register)" if name else
         "samples it (its export names none; an export older than kdiff_jax.export/2 is "
         "sampled after exporting it again)"))
  times = (sampling["times"] if num_steps is None else
           uniform_times(num_steps, sampling["t_start"], sampling["t_end"]))
  return SAMPLERS[name](
      model, meta, noise, labels, method=method or sampling["method"], times=times,
      guidance_scale=sampling["guidance_scale"] if guidance_scale is None else guidance_scale,
      weights=weights)

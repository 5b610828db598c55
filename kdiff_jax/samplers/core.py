"""The sampler core: host-side float64 coefficient plans run by lax.scan (docs/samplers.md).

A method turns the time grid t_0 = t_start > ... > t_N = t_end into a `Plan`: consecutive
`Phase`s, each one step `body` and its per-step coefficients (float64 NumPy arrays computed on
the host from the schedule, leading axis = steps), run by one `lax.scan` over the phase (or a
plain Python loop with scan=False, same math). The step count is static, no `lax.cond` ever
wraps a model call (a step that differs, a warm-up or a last first-order step, is its own
phase), and stochastic steps get one key each, split from the caller's key.

A body of the denoiser methods is `body(carry, c, key, denoise) -> carry` (`run`) with
carry = {'x': x_t, 'hist': tuple of past model outputs, newest first}, `c` this step's
coefficients (cast to x's dtype) and `denoise(x, t) -> (x_hat, n_hat)`, the network turned into
data and noise estimates by parameterization.to_x_eps, the only place those formulas live. A
step's coefficients are a record (a NamedTuple, so a pytree) whose fields name the paper's
quantities, and the body reads them by name (`c.sigma_ratio`, `c.phi(x, e)`); a field may be a
record itself (PNDM's `Transfer`). The plan stores a phase's records stacked, {field: float64
array with one row per step} (a nested record stacked field by field). Samplers with another step
contract (IMM's `step(x, c, key, step_map) -> x`, the few-step maps of `run_maps`) run their plans
through `scan_plan` with their own call.
"""
import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdiff_jax import parameterization
from kdiff_jax.samplers import grids


class Transfer(NamedTuple):
  """PNDM's transfer phi(x, e, t, s) = (alpha_s/alpha_t)·x + alpha_s·(eta_s - eta_t)·e (Liu et al.
  2022's transfer part, in x_bar = x/alpha): an Euler step of d x_bar / d eta = e, DDIM driven
  by e."""

  alpha_ratio: float      # alpha_s/alpha_t
  alpha_delta_eta: float  # alpha_s·(eta_s - eta_t)

  def __call__(self, x, e):
    """phi(x, e, t, s)."""
    return self.alpha_ratio * x + self.alpha_delta_eta * e


@dataclasses.dataclass(frozen=True)
class Context:
  """What a method needs to precompute its coefficients: schedule, float64 times, noise scale."""

  schedule: object
  times: np.ndarray
  method: str
  prediction: str
  noise_std: float = 1.0

  @property
  def num_steps(self):
    return len(self.times) - 1

  def alpha(self, t):
    return np.asarray(self.schedule.alpha(np.asarray(t, np.float64)), np.float64)

  def sigma(self, t):
    return np.asarray(self.schedule.sigma(np.asarray(t, np.float64)), np.float64)

  def alpha_dot(self, t):
    return np.asarray(self.schedule.alpha_dot(np.asarray(t, np.float64)), np.float64)

  def sigma_dot(self, t):
    return np.asarray(self.schedule.sigma_dot(np.asarray(t, np.float64)), np.float64)

  def eta(self, t):
    """sigma/alpha; inf where alpha = 0."""
    return grids.eta_of(self.schedule, t)

  def lambda_(self, t):
    """log(alpha/sigma); -inf where alpha = 0, +inf where sigma = 0."""
    with np.errstate(divide="ignore"):
      return np.log(self.alpha(t)) - np.log(self.sigma(t))

  def to_zero(self, s):
    """Whether a step lands on sigma = 0 (it must stay first order: no model call there)."""
    return float(self.sigma(s)) == 0.0

  @property
  def final_sigma_zero(self):
    return self.to_zero(self.times[-1])

  def alpha_zero(self, t):
    return not float(self.eta(t)) <= grids.ETA_INFINITE

  def require_alpha_positive(self, why):
    """Methods that step in x_bar = x/alpha cannot leave a time where alpha = 0."""
    if self.alpha_zero(self.times[0]):
      raise ValueError(
          f"sampling.method={self.method!r} {why}, so it is undefined where alpha(t) = 0, and "
          f"alpha(t_start={self.times[0]}) = 0 for schedule {self.schedule.name!r}. Start at "
          f"sampling.t_start < 1 (e.g. 0.999), or use 'euler', 'heun', 'ddim' or 'dpm_solver_2m'.")

  def phi(self, t, s) -> Transfer:
    """The transfer phi(., ., t, s) with its float64 coefficients."""
    alpha_t, alpha_s = self.alpha(t), self.alpha(s)
    return Transfer(alpha_ratio=float(alpha_s / alpha_t),
                    alpha_delta_eta=float(alpha_s * (self.eta(s) - self.eta(t))))


@dataclasses.dataclass(frozen=True)
class Phase:
  """Consecutive steps sharing one body and one record type; coefs[field] has one row per step."""

  body: Callable
  coefs: dict
  record: type    # the NamedTuple the body reads its coefficients as
  stochastic: bool = False

  def step_coefs(self, coefs: dict):
    """One step's coefficients (a row of every field) as the body reads them."""
    return self.record(**coefs)

  @property
  def length(self):
    return len(jax.tree.leaves(self.coefs)[0])


def _init_carry(x, denoise):
  del denoise
  return {"x": x, "hist": ()}


@dataclasses.dataclass(frozen=True)
class Plan:
  phases: tuple
  init: Callable = _init_carry  # init(x, denoise) -> carry; may call the model (UniPC)

  @property
  def stochastic(self):
    return any(p.stochastic for p in self.phases)

  @property
  def num_steps(self):
    return sum(p.length for p in self.phases)


def _stacked(rows) -> dict:
  """{field: float64 array, one row per record} of equal records (a nested record field by
  field)."""
  return {name: jax.tree.map(lambda *values: np.asarray(values, np.float64),
                             *(getattr(row, name) for row in rows))
          for name in rows[0]._fields}


def steps_to_plan(steps, init=_init_carry):
  """Group a per-step list of (body, record, stochastic) into phases of equal consecutive bodies
  and record types."""
  phases = []
  for body, c, stochastic in steps:
    if phases and phases[-1][0] is body and phases[-1][2] == stochastic \
        and type(phases[-1][1][0]) is type(c):
      phases[-1][1].append(c)
    else:
      phases.append((body, [c], stochastic))
  return Plan(tuple(Phase(body, _stacked(rows), type(rows[0]), stochastic)
                    for body, rows, stochastic in phases), init)


def push(hist, value):
  """The history buffer with `value` as newest entry (fixed length; the oldest drops out)."""
  return ((value,) + hist[:-1]) if hist else ()


def make_denoiser(model_fn, prediction, schedule, *, k=None, noise_std=1.0, min_divisor=0.0):
  """denoise(x, t) -> (x_hat, n_hat): one model call at scalar time t, as a [B] vector of x's dtype.

  k: k-Diff's k, or a function k(t) of that time vector (a time-dependent k).
  """

  def denoise(x, t):
    t_vec = jnp.full((x.shape[0],), t, x.dtype)
    output = jnp.asarray(model_fn(x, t_vec)).astype(x.dtype)
    return parameterization.to_x_eps(prediction, output, x, t_vec, schedule,
                                     k=k(t_vec) if callable(k) else k, noise_std=noise_std,
                                     min_divisor=min_divisor)

  return denoise


def _check_key(plan, key, method):
  if plan.stochastic and key is None:
    raise ValueError(f"sampling.method={method!r} with these options is stochastic: pass key=")


def run(plan, x, denoise, key=None, *, scan=True, method=""):
  """Execute a denoiser method's plan from x = x_{t_start}; one lax.scan per phase (or a Python
  loop): every step is body(carry, coefs, key, denoise)."""
  _check_key(plan, key, method)
  carry = scan_plan(plan, plan.init(x, denoise), key, x.dtype,
                    lambda body, carry, coefs, key_i: body(carry, coefs, key_i, denoise),
                    scan=scan, method=method)
  return carry["x"]


def scan_plan(plan, carry, key, dtype, call, *, scan=True, method=""):
  """carry after every step of `plan`: carry = call(body, carry, coefs, key_i) per step, the
  coefficients cast to `dtype`, key_i one split of `key` per step (stochastic phases only)."""
  _check_key(plan, key, method)
  step_keys = jax.random.split(key, plan.num_steps) if plan.stochastic else None
  offset = 0
  for phase in plan.phases:
    coefs = jax.tree.map(lambda value: jnp.asarray(value, dtype), phase.coefs)
    keys = step_keys[offset:offset + phase.length] if phase.stochastic else None
    offset += phase.length

    def step(carry, inputs, phase=phase):
      coefs_i, key_i = inputs
      return call(phase.body, carry, phase.step_coefs(coefs_i), key_i), None

    if scan:
      carry, _ = jax.lax.scan(step, carry, (coefs, keys))
    else:
      for i in range(phase.length):
        carry, _ = step(carry, jax.tree.map(lambda a, i=i: a[i], (coefs, keys)))
  return carry


def gaussian(key, x, scale):
  """scale·z, z ~ N(0, I) like x (scale already includes noise_std)."""
  return scale * jax.random.normal(key, x.shape, x.dtype)


def transfer_step(carry, c, key, denoise):
  """x_s = phi(x_t, e, t, s), e = n_hat(x_t, t): the first-order step of the eps-driven methods
  (c: a record with t and phi, a Transfer)."""
  x = carry["x"]
  _, e = denoise(x, c.t)
  return {"x": c.phi(x, e), "hist": push(carry["hist"], e)}


# --- the few-step maps ---------------------------------------------------------------------------

class MapStep(NamedTuple):
  """A few-step sampler's step t -> s with a trained map (IMM's f_{s,t}, MeanFlow's average
  velocity, TVM's terminal velocity)."""

  t: float  # where the step starts
  s: float  # where it lands, s < t


def map_steps(times) -> list:
  """[MapStep(t_i, t_{i+1}) for i = 0 .. N-1] of a decreasing float64 grid."""
  times = np.asarray(times, np.float64)
  if not np.all(np.diff(times) < 0):
    raise ValueError(f"the time grid must decrease, got {times.tolist()}")
  return [MapStep(t=t, s=s) for t, s in zip(times[:-1], times[1:])]


def run_maps(step, x, times, *, scan=True):
  """x at times[-1] from x = x at times[0]: x <- step(x, c) for c = MapStep(t_i, t_{i+1}) in x's
  dtype, one lax.scan over the grid (so `jax.jit` compiles one step body however many steps)."""
  the_plan = steps_to_plan([(step, c, False) for c in map_steps(times)])
  return scan_plan(the_plan, x, None, x.dtype, lambda body, x, c, key: body(x, c), scan=scan)

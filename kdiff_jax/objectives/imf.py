"""Improved MeanFlow (iMF; Geng et al. 2025, "Improved Mean Flows", official code
Lyy-iiis/imeanflow `imf.py`; docs/objectives/meanflow.md): objective.name = 'imf', options
objective.imf.*, on the in-context DiT model.name = 'imf_dit'. Runs saved before iMF had its
own name (objective.name = 'meanflow' with objective.meanflow.variant = 'imf') are read as this
objective (`upgrade`).

MeanFlow's draws, row layout, label dropout and adaptive weight (objectives/meanflow.py), with
three changes. Per example (the batch mean at the end):

* Guidance is a network input. Each row draws ω from the power law p(ω) ∝ ω^(-β) on
  [1, 1 + s_max] (β = cfg_beta; β = 1: ω = (1 + s_max)^u, u ~ U[0, 1]) and an interval
  t_min ~ U[0, split], t_max ~ U[split, 1] ([0, 1] on the rows with r = t). The network
  u(z, h = t - r, ω, [t_min, t_max], y) sees them; its v head v(z, ω, y) (at h = 0, [0, 1]) is
  the instantaneous velocity.
* The target. ω_w = ω for t in [t_min, t_max] (closed), 1 outside;
    v_c = v(z_t, ω_w, y),  v_u = v(z_t, 1, null)               (no gradient)
    v_g = v + (1 - 1/ω_w)·(v_c - v_u)                          (v_g = v on dropped rows)
* The v-loss. The JVP tangent for z is the network's own conditional velocity v_c:
    (u, du/dt, v_head) = jvp(u_θ(·, ·, h = t - r, ω, [t_min, t_max], y_in), (z_t, t, r),
                             (v_c, 1, 0)) with the v head as auxiliary output
    V = u + (t - r)·sg(du/dt)
    L_u = Σ (V - sg(v_g))²,  L_v = Σ (v_head - sg(v_g))²,  loss = w(L_u) + w(L_v)
  with MeanFlow's adaptive weight w(L) = L / sg((L + c)^p). y_in is the label after dropout
  (dropped rows keep their drawn ω and interval); v_c carries the original label.

The official step computes v_c twice: first at the drawn ω (one doubled batch with v_u) for the
rows with r = t, then again at ω_w. On a row with r = t the interval is [0, 1], so ω_w = ω and
both are the same, and on a row outside its interval 1 - 1/ω_w = 0; so one pass of v_c at ω_w
gives the same v_g everywhere. The cheaper step (default; objective.imf.full_batch_jvp = True
runs the official one) goes further, as MeanFlow's: the JVP runs only on the r != t rows
(on r = t rows V = u), and on an r = t row whose label is kept the training forward's own v head
*is* v_c (same input), taken under stop_gradient, so those rows need only the v_u pass. Both
steps give the same loss and gradients (tests/test_imf.py).

aux_v_head = False is the ablation without the v head: the instantaneous velocity is the u head
at h = 0 (MeanFlow's) and the loss is w(L_u) alone.
"""
import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from kdiff_jax import parameterization, schedules
from kdiff_jax.objectives import meanflow
from kdiff_jax.rules import boolean, number

# The loss differentiates the network with jax.jvp (objectives.check: attention 'xla').
JVP = True


def defaults():
  """objective.imf: MeanFlow's row layout and adaptive weight (objectives/meanflow.py) with iMF's
  share, and the guidance inputs drawn per row."""
  return ml_collections.ConfigDict(dict(
      share_r_equals_t=0.5,       # rows with r = t (no JVP term); a fraction n/m, m <= 64
      adaptive_p=1.0,             # loss w(L) = L/sg((L + c)^p); p = 0: plain squared error
      adaptive_c=0.01,
      full_batch_jvp=False,       # True: the official step (v_c twice, the JVP on every row)
      s_max=7.0,                  # omega on [1, 1 + s_max] (0: no guidance)
      cfg_beta=1.0,               # p(omega) ∝ omega^-cfg_beta (1: log-uniform)
      interval_split=0.5,         # t_min ~ U[0, split], t_max ~ U[split, 1] ([0, 1] on r = t rows)
      aux_v_head=True,            # the v head (its loss; guidance and the JVP tangent from it); False: u at h = 0
  ))


RULES = {
    **meanflow.LAYOUT_RULES,
    "s_max": number(0),
    "cfg_beta": number(0),
    "interval_split": number(0, 1, low_open=True, high_open=True),
    "aux_v_head": boolean(),
}


def upgrade(saved: dict) -> dict:
  """A config saved before iMF had its name, rewritten: objective.meanflow.variant = 'imf' is
  objective.name = 'imf' with objective.imf = MeanFlow's share_r_equals_t, adaptive_p,
  adaptive_c, full_batch_jvp and objective.meanflow.imf.*; a MeanFlow run drops the two fields.
  Configs without objective.meanflow.variant are returned as they are."""
  old = saved.get("objective", {}).get("meanflow", {})
  if "variant" not in old:
    return saved
  meanflow_section = {key: value for key, value in old.items() if key not in ("variant", "imf")}
  objective = dict(saved["objective"], meanflow=meanflow_section)
  if old["variant"] == "imf":
    objective["name"] = "imf"
    objective["imf"] = dict({key: old[key] for key in meanflow.LAYOUT_RULES if key in old},
                            **old.get("imf", {}))
  return dict(saved, objective=objective)


@dataclasses.dataclass(frozen=True)
class Draws:
  """The random choices of one iMF batch (MeanFlow's, plus the guidance inputs).

  t, r: [B] (r = t on the layout's rows); noise: x's shape; labels: the network's labels after
  dropout; dropped: [B] bool; omega: [B] guidance scales in [1, 1 + s_max]; t_min, t_max: [B]
  guidance intervals ([0, 1] on the rows with r = t).
  """

  t: jax.Array
  r: jax.Array
  noise: jax.Array
  labels: jax.Array
  dropped: jax.Array
  omega: jax.Array
  t_min: jax.Array
  t_max: jax.Array


jax.tree_util.register_dataclass(
    Draws, data_fields=["t", "r", "noise", "labels", "dropped", "omega", "t_min", "t_max"],
    meta_fields=[])


def sample_omega(rng, batch_size, s_max, beta):
  """[B] ω from p(ω) ∝ ω^(-β) on [1, 1 + s_max], by the inverse CDF of u ~ U[0, 1]:
  β = 1: ω = exp(u·log(1 + s_max)); else ω = (1 + u·((1 + s_max)^(1-β) - 1))^(1/(1-β))."""
  u = jax.random.uniform(rng, (batch_size,), jnp.float32)
  log_top = jnp.log1p(jnp.float32(s_max))
  if beta == 1.0:
    return jnp.exp(u * log_top)
  return jnp.exp(jnp.log1p(u * jnp.expm1((1.0 - beta) * log_top)) / (1.0 - beta))


def sample_interval(rng, equal, split):
  """(t_min, t_max), [B] each: U[0, split] and U[split, 1]; (0, 1) on the `equal` rows."""
  rng_low, rng_high = jax.random.split(rng)
  shape = equal.shape
  t_min = jax.random.uniform(rng_low, shape, jnp.float32, 0.0, split)
  t_max = jax.random.uniform(rng_high, shape, jnp.float32, split, 1.0)
  return jnp.where(equal, 0.0, t_min), jnp.where(equal, 1.0, t_max)


def draw(rng, x, labels, config) -> Draws:
  """The draws of one batch (x: [B, ...] data, labels: [B]); MeanFlow's t, r, noise and dropped
  rows (meanflow.draw) with ω and the interval."""
  options = config.objective.imf
  rng_meanflow, rng_omega, rng_interval = jax.random.split(rng, 3)
  base = meanflow.draw(rng_meanflow, x, labels, config)
  equal = meanflow.r_equals_t_rows(x.shape[0], options.share_r_equals_t)
  omega = sample_omega(rng_omega, x.shape[0], options.s_max, options.cfg_beta)
  t_min, t_max = sample_interval(rng_interval, equal, options.interval_split)
  return Draws(base.t, base.r, base.noise, base.labels, base.dropped, omega, t_min, t_max)


def _at_least_f32(a):
  """a in float32, or float64 where the network runs in float64 (the derivative tests)."""
  return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def _sum_over_elements(a):
  return jnp.sum(a, axis=tuple(range(1, a.ndim)))


def make_step(config, apply_fn, options, aux):
  """step(net_params, z, v, labels, draws) -> (u, V, v_head, sg(v_g)), each z's shape: the
  guidance target and the compound function on z = z_t with the instantaneous velocity v (the
  official full-batch step where options.full_batch_jvp, else the cheaper one). options: the
  method's section (share_r_equals_t, full_batch_jvp; iMF's or pMF's), aux: the v head is used.
  """
  null_label = config.data.num_classes
  share = options.share_r_equals_t
  time = lambda a, like: parameterization.broadcast_time(a, like)

  def network(net_params, z, t, r, labels, omega, t_min, t_max):
    """(u at h = t - r, the instantaneous velocity head at these inputs) in float32; without
    the v head the second is u itself (the u head is the instantaneous velocity at h = 0)."""
    out = apply_fn(net_params, z, t, labels, t - r, guidance=omega, interval=(t_min, t_max),
                   v_head=aux)
    u, v = out if aux else (out, out)
    return _at_least_f32(u), _at_least_f32(v)

  def velocity(net_params, z, t, labels, omega):
    """v(z_t, ω, labels) at h = 0, interval [0, 1], without gradient (only the head it needs)."""
    ones = jnp.ones_like(t)
    out = apply_fn(net_params, z, t, labels, jnp.zeros_like(t), guidance=omega,
                   interval=(jnp.zeros_like(t), ones), v_head=aux, u_head=not aux)
    return jax.lax.stop_gradient(_at_least_f32(out))

  def conditional_and_null(net_params, z, t, y, omega):
    """(v_c at (ω, y), v_u at (1, null)): one doubled batch."""
    both = velocity(net_params, jnp.concatenate([z, z]), jnp.concatenate([t, t]),
                    jnp.concatenate([y, jnp.full_like(y, null_label)]),
                    jnp.concatenate([omega, jnp.ones_like(omega)]))
    return jnp.split(both, 2)

  def guided(v, v_c, v_u, omega, dropped):
    """v_g = v + (1 - 1/ω)·(v_c - v_u); v on dropped rows."""
    v_g = v + time(1.0 - 1.0 / omega, v) * (v_c - v_u)
    return jnp.where(time(dropped, v), v, v_g)

  def compound(net_params, z, t, r, labels, omega, t_min, t_max, v_c):
    """(u, V = u + (t - r)·sg(du/dt), the v head), du/dt by jax.jvp along (v_c, 1, 0)."""
    fn = lambda z_, t_, r_: network(net_params, z_, t_, r_, labels, omega, t_min, t_max)
    u, du_dt, v_head = jax.jvp(fn, (z, t, r), (v_c, jnp.ones_like(t), jnp.zeros_like(r)),
                               has_aux=True)
    return u, u + time(t - r, u) * jax.lax.stop_gradient(du_dt), v_head

  def window(omega, t, t_min, t_max):
    return jnp.where((t >= t_min) & (t <= t_max), omega, 1.0)

  def full_batch(net_params, z, v, y, d: Draws):
    """The official step: v_c at the drawn ω and again at ω_w, the JVP on every row."""
    equal = meanflow.r_equals_t_rows(z.shape[0], share)
    v_c0, v_u = conditional_and_null(net_params, z, d.t, y, d.omega)
    v_g_equal = v + time(1.0 - 1.0 / d.omega, v) * (v_c0 - v_u)
    omega_w = window(d.omega, d.t, d.t_min, d.t_max)
    v_c = velocity(net_params, z, d.t, y, omega_w)
    v_g = v + time(1.0 - 1.0 / omega_w, v) * (v_c - v_u)
    v_g = jnp.where(time(equal, v), v_g_equal, v_g)
    v_g = jnp.where(time(d.dropped, v), v, v_g)
    u, big_v, v_head = compound(net_params, z, d.t, d.r, d.labels, d.omega, d.t_min, d.t_max,
                                v_c)
    return u, big_v, v_head, jax.lax.stop_gradient(v_g)

  def split(net_params, z, v, y, d: Draws):
    """Ours: no JVP on the r = t rows, whose kept-label forward gives their own v_c."""
    parts = lambda a: meanflow.split_rows(a, share)
    (z_e, z_n), (v_e, v_n), (y_e, y_n) = parts(z), parts(v), parts(y)
    (t_e, t_n), (r_n,) = parts(d.t), parts(d.r)[1:]
    (in_e, in_n), (drop_e, drop_n), (w_e, w_n) = parts(d.labels), parts(d.dropped), parts(d.omega)
    (lo_e, lo_n), (hi_e, hi_n) = parts(d.t_min), parts(d.t_max)
    outputs = []
    if t_e.size:
      u_e, head_e = network(net_params, z_e, t_e, t_e, in_e, w_e, lo_e, hi_e)
      v_u_e = velocity(net_params, z_e, t_e, jnp.full_like(y_e, null_label), jnp.ones_like(w_e))
      v_g_e = guided(v_e, jax.lax.stop_gradient(head_e), v_u_e, w_e, drop_e)
      outputs.append((u_e, u_e, head_e, jax.lax.stop_gradient(v_g_e)))
    if t_n.size:
      omega_w = window(w_n, t_n, lo_n, hi_n)
      v_c, v_u = conditional_and_null(net_params, z_n, t_n, y_n, omega_w)
      v_g_n = guided(v_n, v_c, v_u, omega_w, drop_n)
      u_n, big_v, head_n = compound(net_params, z_n, t_n, r_n, in_n, w_n, lo_n, hi_n, v_c)
      outputs.append((u_n, big_v, head_n, jax.lax.stop_gradient(v_g_n)))
    if len(outputs) == 1:
      return outputs[0]
    return tuple(meanflow.merge_rows(a, b, share) for a, b in zip(*outputs))

  return full_batch if options.full_batch_jvp else split


def velocity_losses(big_v, v_head, v_g, options, aux):
  """{'loss': w(L_u) + w(L_v) (w(L_u) alone without the v head), 'error_u': L_u = Σ (V - v_g)²,
  'error_v': L_v = Σ (v_head - v_g)² (zeros without it), 'compound': V, 'guided': v_g}, with
  w = meanflow.adaptive_weighting at options.adaptive_p, adaptive_c."""
  weight = lambda error: meanflow.adaptive_weighting(error, options.adaptive_p, options.adaptive_c)
  error_u = _sum_over_elements(jnp.square(big_v - v_g))
  error_v = _sum_over_elements(jnp.square(v_head - v_g)) if aux else jnp.zeros_like(error_u)
  loss = weight(error_u) + (weight(error_v) if aux else 0.0)
  return {"loss": loss, "error_u": error_u, "error_v": error_v, "compound": big_v, "guided": v_g}


def make_example_losses(config, apply_fn):
  """example_losses(net_params, x, labels, draws) -> {'loss', 'error_u', 'error_v'}: [B], and
  'compound' (V) and 'guided' (v_g), each x's shape (`velocity_losses`). x: [B, ...] data,
  labels: [B] the true labels (v_c's), draws: `Draws`; the velocity v = e - x.
  """
  cfg = config.objective
  options = cfg.imf
  step = make_step(config, apply_fn, options, options.aux_v_head)

  def example_losses(net_params, x, labels, draws: Draws):
    schedule = schedules.get(cfg.schedule)
    z = parameterization.interpolate(x, draws.noise, draws.t, schedule)
    v = parameterization.from_x_eps("velocity", x, draws.noise, draws.t, schedule)  # e - x
    _, big_v, v_head, v_g = step(net_params, z, v, labels, draws)
    return velocity_losses(big_v, v_head, v_g, options, options.aux_v_head)

  return example_losses


@dataclasses.dataclass(frozen=True)
class GuidedAverageVelocity(meanflow.AverageVelocity):
  """MeanFlow's average velocity u(z, h = t - r, ω, [t_min, t_max], y) whose guidance ω and
  interval are network inputs, taken from sampling.guidance_scale and guidance_interval (one
  pass per step). The network saw ω in [1, 1 + s_max] and intervals with t_min <= split <= t_max;
  `section` names the objective whose fields these are (objective.imf, or objective.pmf: pMF's
  network converts its x-predictions to u itself, so it is sampled the same way)."""

  s_max: float = 7.0
  interval_split: float = 0.5
  section: str = "imf"
  torch_sampler: ClassVar[str] = "imf"   # export/torch_sampling.sample_imf

  def conditioning(self, config) -> dict:
    chosen = config.sampling
    return dict(guidance=chosen.guidance_scale, interval=tuple(chosen.guidance_interval))

  def check_sampling(self, config) -> None:
    """ω and the interval within what the network was trained on."""
    top, split, section = 1.0 + self.s_max, self.interval_split, self.section
    scale = config.sampling.guidance_scale
    if not 1.0 <= scale <= top:
      raise ValueError(f"sampling.guidance_scale={scale}: the network was trained on omega in "
                       f"[1, 1 + objective.{section}.s_max] = [1, {top}]")
    low, high = tuple(config.sampling.guidance_interval)
    if not (0.0 <= low <= split <= high <= 1.0):
      raise ValueError(f"sampling.guidance_interval={(low, high)}: the network was trained on "
                       f"t_min in [0, {split}] and t_max in [{split}, 1] "
                       f"(objective.{section}.interval_split)")


def check(config) -> None:
  """Fail before compiling on settings iMF cannot train with."""
  check_guided(config, "imf", "imf_dit", "feeds guidance and its interval to the network")


def check_guided(config, name: str, model_name: str, why: str) -> None:
  """The checks iMF and pMF share: objective `name` needs model.name = model_name (`why` says
  for what), the linear path, and a row layout its share can make."""
  cfg = config.objective
  if config.model.name != model_name:
    raise ValueError(f"objective.name={name!r} {why}: set model.name={model_name!r} "
                     f"(not {config.model.name!r})")
  if cfg.schedule != "rectified_flow":
    raise ValueError(f"objective.schedule={cfg.schedule!r}: {name} is defined on the linear "
                     "path z_t = (1 - t)·x + t·e: set objective.schedule='rectified_flow'")
  meanflow.row_layout(cfg[name].share_r_equals_t, name)


def describe(config) -> GuidedAverageVelocity:
  """The trained network: MeanFlow's average velocity with ω and the interval as inputs."""
  options = config.objective.imf
  return GuidedAverageVelocity(schedules.get(config.objective.schedule), s_max=options.s_max,
                               interval_split=options.interval_split)


def build(config, apply_fn):
  check(config)
  return meanflow.objective(config, draw, make_example_losses(config, apply_fn),
                            ("error_u", "error_v"), describe(config))

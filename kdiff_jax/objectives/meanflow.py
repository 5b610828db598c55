"""MeanFlow (Geng, Deng, Bai, Kolter, He 2025, arXiv 2505.13447; docs/objectives/meanflow.md).

The network learns the average velocity of the flow between two times r <= t,

  u(z_t, r, t) = 1/(t - r)·∫_r^t v(z_tau, tau) dtau,   so that   z_r = z_t - (t - r)·u,

from the MeanFlow identity u = v - (t - r)·du/dt, where du/dt = v·∂_z u + ∂_t u is the JVP of
u along (v, 1, 0) in (z, t, r). On rectified flow, z_t = (1 - t)·x + t·e and v = e - x. Per
example (the batch mean at the end):

  (u, du/dt) = jvp(u_theta(·, ·, h = t - r, y_in), (z_t, t, r), (v_g, 1, 0))
  u_tgt = stop_gradient(v_g - clip(t - r, 0, 1)·du/dt)
  L = sum over elements (u - u_tgt)^2,   loss = L / stop_gradient((L + c)^p)

with the guided velocity v_g = omega·v + (1 - omega - kappa)·v_uncond + kappa·v_cond for t in
[t_start, t_end] (v_g = v outside, and on the rows whose label is dropped), v_uncond and
v_cond the network's own instantaneous velocity u_theta(z_t, t, h = 0, null or y) without
gradient. Sampling at guidance scale 1 then draws from the class-conditional model guided at
omega/(1 - kappa). The network is a DiT whose second time embedder reads h = t - r.

Rows. A share `share_r_equals_t` of the rows has r = t (there t - r = 0, so the JVP term
vanishes and u_tgt = v_g); MeanFlow puts them first in the batch. Here they are laid out in
groups of m consecutive rows (`row_layout`: the share is n/m), the first n of each group with
r = t, and m is the objective's `group_size`, so every device holds the same share of each
kind and the split below needs no communication. The labels dropped for guidance (a count
num_drop ~ Binomial(B, p), as MeanFlow draws it) go to the r = t rows first, in row order.

The cheaper step (the default; `full_batch_jvp=True` computes it the authors' way): the JVP
runs only on the r != t rows, the guidance forwards v_uncond, v_cond at h = 0 only where they
are needed, and on a row with r = t the training forward itself *is* v_cond (same input, h = 0,
its own label), so v_cond is taken from it under stop_gradient. Both give the same loss and
gradients; with kappa > 0 the authors' step costs about 2 flow-matching steps, this one
1.5 (benchmarks/RESULTS.md).
"""
import dataclasses
import fractions
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from kdiff_jax import parameterization, samplers, schedules
from kdiff_jax.objectives import flow
from kdiff_jax.rules import boolean, interval, number

# The largest group of rows over which share_r_equals_t = n/m is laid out.
MAX_GROUP = 64
# The loss differentiates the network with jax.jvp (objectives.check: attention 'xla').
JVP = True


def defaults():
  """objective.meanflow (docs/objectives/meanflow.md): t, r from objective.time_sampling
  (MeanFlow: logit_normal, mean -0.4, std 1), labels dropped with objective.label_dropout; needs
  model.second_time_embedder = True (h = t - r) and, as MeanFlow embeds it, model.time_scale = 1."""
  return ml_collections.ConfigDict(dict(
      share_r_equals_t=0.75,      # rows with r = t (no JVP term); a fraction n/m, m <= 64
      omega=1.0,                  # guidance in training: v_g = omega·v + (1 - omega - kappa)·v_uncond
      kappa=0.5,                  #   + kappa·v_cond (effective scale omega/(1 - kappa)); omega = 1,
      guidance_interval=(0.0, 1.0),  # kappa = 0: off; only for t in this interval
      adaptive_p=1.0,             # loss L/sg((L + c)^p); p = 0: plain squared error
      adaptive_c=0.01,
      full_batch_jvp=False,       # True: the authors' step (guidance forwards and JVP on every row)
  ))


# The fields MeanFlow's row layout and weighting read, shared with iMF's section (objectives/imf.py).
LAYOUT_RULES = {
    "share_r_equals_t": number(0, 1),
    "adaptive_p": number(0),
    "adaptive_c": number(0, low_open=True),
    "full_batch_jvp": boolean(),
}
RULES = {
    **LAYOUT_RULES,
    "omega": number(0),
    "kappa": number(0, 1, high_open=True),
    "guidance_interval": interval(number(0, 1)),
}


def section(config):
  """The section of config's objective (objective.meanflow, or objective.imf for iMF), whose
  share_r_equals_t, adaptive_p, adaptive_c and full_batch_jvp the shared helpers here read."""
  return config.objective[config.objective.name]


@dataclasses.dataclass(frozen=True)
class AverageVelocity:
  """A network whose output at (z_t, t, h = t - r, labels) is the average velocity u(z_t, r, t).

  One step from t to r is z_r = z_t - (t - r)·u (samplers/mean_flow.py); at h = 0 the output
  is the instantaneous velocity v(z_t, t). `schedule` is the path's (rectified flow), for the
  grids.
  """

  schedule: schedules.Schedule

  # mean_flow (samplers/mean_flow.py): z <- z - (t - r)·u, guidance trained in.
  methods: ClassVar[tuple] = samplers.mean_flow.METHODS
  torch_sampler: ClassVar[str] = "mean_flow"   # export/torch_sampling.sample_mean_flow

  def velocity(self, apply_fn, net_params, z_t, t, r, labels, **conditioning):
    """u(z_t, r, t | labels) in float32; t, r: [B]."""
    return apply_fn(net_params, z_t, t, labels, t - r, **conditioning).astype(jnp.float32)

  def conditioning(self, config) -> dict:
    """The network's inputs besides (z, t, h, y) when sampling with config.sampling: none."""
    del config
    return {}

  def check_sampling(self, config) -> None:
    del config   # MeanFlow's check refuses a guidance scale (it is trained in)

  def time_grid(self, config):
    return flow.sampling_times(config, self.schedule)

  def plan(self, config):
    return self.time_grid(config)

  def sampler(self, config, apply_fn):
    """z_{t_end} by z <- z - (t - r)·u(z, t, h = t - r, y, **conditioning) on the time grid."""
    times, conditioning = self.time_grid(config), self.conditioning(config)

    def sample(params, noise, labels, key):
      del key  # deterministic
      average_velocity = lambda z, t, r, y: self.velocity(apply_fn, params["net"], z, t, r, y,
                                                          **conditioning)
      return samplers.mean_flow.sample(average_velocity, noise, labels, times=times)
    return sample

  def export(self, config, params_by_weights) -> dict:
    del config, params_by_weights
    return {}


@dataclasses.dataclass(frozen=True)
class Draws:
  """The random choices of one MeanFlow batch: the loss is a function of these and the weights.

  t, r: [B] times with r <= t (r = t on the layout's rows); noise: e, x's shape; labels: the
  network's labels after dropout; dropped: [B] bool, the rows whose label was dropped.
  """

  t: jax.Array
  r: jax.Array
  noise: jax.Array
  labels: jax.Array
  dropped: jax.Array


jax.tree_util.register_dataclass(Draws, data_fields=["t", "r", "noise", "labels", "dropped"],
                                 meta_fields=[])


def row_layout(share_r_equals_t: float, section: str = "meanflow") -> tuple[int, int]:
  """(m, n): rows come in groups of m, the first n of each with r = t; n/m = share_r_equals_t
  (objective.<section>.share_r_equals_t, named in the error)."""
  share = fractions.Fraction(share_r_equals_t).limit_denominator(MAX_GROUP)
  if abs(float(share) - share_r_equals_t) > 1e-9:
    raise ValueError(f"objective.{section}.share_r_equals_t={share_r_equals_t}: must be a "
                     f"fraction n/m with m <= {MAX_GROUP} (e.g. 0.75 = 3/4), so that every device "
                     "holds the same share of r = t rows")
  return share.denominator, share.numerator


def r_equals_t_rows(batch_size: int, share_r_equals_t: float) -> jax.Array:
  """[B] bool: the rows with r = t, the first n of every group of m (`row_layout`)."""
  m, n = row_layout(share_r_equals_t)
  return jnp.arange(batch_size) % m < n


def split_rows(a, share_r_equals_t: float):
  """(a on the r = t rows, a on the r != t rows), each in row order; inverse: `merge_rows`.

  A reshape into groups of m and a slice: on a batch sharded by whole groups it stays local.
  """
  m, n = row_layout(share_r_equals_t)
  grouped = a.reshape((-1, m) + a.shape[1:])
  flat = lambda part: part.reshape((-1,) + a.shape[1:])
  return flat(grouped[:, :n]), flat(grouped[:, n:])


def merge_rows(equal, unequal, share_r_equals_t: float):
  """The batch whose split_rows is (equal, unequal)."""
  m, n = row_layout(share_r_equals_t)
  tail = equal.shape[1:] if equal.size else unequal.shape[1:]
  parts = [p.reshape((-1, k) + tail) for p, k in ((equal, n), (unequal, m - n)) if k]
  return jnp.concatenate(parts, axis=1).reshape((-1,) + tail)


def sample_times(rng, batch_size, objective_config):
  """(t, r): two draws of p(t) (flow.sample_time: logit-normal or uniform), t = max, r = min;
  r = t on the layout's rows (`r_equals_t_rows`)."""
  rng_a, rng_b = jax.random.split(rng)
  a = flow.sample_time(rng_a, batch_size, objective_config)
  b = flow.sample_time(rng_b, batch_size, objective_config)
  t, r = jnp.maximum(a, b), jnp.minimum(a, b)
  equal = r_equals_t_rows(batch_size, objective_config[objective_config.name].share_r_equals_t)
  return t, jnp.where(equal, t, r)


def dropped_rows(rng, batch_size, probability, share_r_equals_t):
  """[B] bool: num_drop ~ Binomial(B, probability) rows, the r = t rows first, each in row order.

  MeanFlow counts the uniforms below p and drops that many rows from the front of the batch,
  where its r = t rows are; this keeps that joint layout on our interleaved rows.
  """
  num_drop = jnp.sum(jax.random.uniform(rng, (batch_size,)) < probability)
  equal = r_equals_t_rows(batch_size, share_r_equals_t)
  rank = jnp.where(equal, jnp.cumsum(equal) - 1, jnp.sum(equal) + jnp.cumsum(~equal) - 1)
  return rank < num_drop


def draw(rng, x, labels, config) -> Draws:
  """The draws of one batch (x: [B, ...] data, labels: [B])."""
  cfg = config.objective
  rng_time, rng_noise, rng_drop = jax.random.split(rng, 3)
  batch_size = x.shape[0]
  t, r = sample_times(rng_time, batch_size, cfg)
  noise = cfg.noise_std * jax.random.normal(rng_noise, x.shape, jnp.float32)
  dropped = dropped_rows(rng_drop, batch_size, cfg.label_dropout, section(config).share_r_equals_t)
  return Draws(t, r, noise, jnp.where(dropped, config.data.num_classes, labels), dropped)


def guided_velocity(v, v_uncond, v_cond, t, dropped, *, omega, kappa, interval):
  """v_g = omega·v + (1 - omega - kappa)·v_uncond + kappa·v_cond on t in interval (closed);
  v_g = v outside it and on dropped rows. v_cond may be None when kappa = 0."""
  inside = (t >= interval[0]) & (t <= interval[1])
  omega_t = parameterization.broadcast_time(jnp.where(inside, omega, 1.0), v)
  guided = omega_t * v + (1.0 - omega_t) * v_uncond
  if kappa:
    kappa_t = parameterization.broadcast_time(jnp.where(inside, kappa, 0.0), v)
    guided = guided + kappa_t * (v_cond - v_uncond)
  return jnp.where(parameterization.broadcast_time(dropped, v), v, guided)


def adaptive_weighting(squared_error, p, c):
  """L / stop_gradient((L + c)^p) (MeanFlow Sec. 4.3; p = 0: the plain squared error)."""
  return squared_error / jax.lax.stop_gradient((squared_error + c) ** p)


def _sum_over_elements(a):
  return jnp.sum(a, axis=tuple(range(1, a.ndim)))


def make_example_losses(config, apply_fn):
  """example_losses(net_params, x, labels, draws, **dropout) -> {'loss', 'error', 'v_error'}: [B].

  loss: the adaptively weighted L; error: L = sum (u - u_tgt)^2; v_error: sum (u - v)^2 (a
  diagnostic). x: [B, ...] data, labels: [B] the true labels (v_cond's), draws: `Draws`.
  """
  cfg = config.objective
  options = cfg.meanflow
  average = describe(config)
  null_label = config.data.num_classes
  guide = dict(omega=options.omega, kappa=options.kappa, interval=tuple(options.guidance_interval))
  guided = options.omega != 1.0 or options.kappa != 0.0
  share = options.share_r_equals_t

  def velocity_at(net_params, z, t, labels, **dropout):
    """The network's instantaneous velocity u(z, t, t) without gradient."""
    return jax.lax.stop_gradient(average.velocity(apply_fn, net_params, z, t, t, labels,
                                                  **dropout))

  def mean_velocity_and_derivative(net_params, z, t, r, labels, v_g, **dropout):
    u_fn = lambda z_, t_, r_: average.velocity(apply_fn, net_params, z_, t_, r_, labels, **dropout)
    return jax.jvp(u_fn, (z, t, r), (v_g, jnp.ones_like(t), jnp.zeros_like(r)))

  def target(v_g, du_dt, t, r):
    return jax.lax.stop_gradient(
        v_g - parameterization.broadcast_time(jnp.clip(t - r, 0.0, 1.0), v_g) * du_dt)

  def full_batch(net_params, z, v, t, r, y, draws, **dropout):
    """The authors' step: guidance forwards and the JVP on every row."""
    v_g = v
    if guided:
      v_uncond = velocity_at(net_params, z, t, jnp.full_like(y, null_label), **dropout)
      v_cond = velocity_at(net_params, z, t, y, **dropout) if options.kappa else None
      v_g = guided_velocity(v, v_uncond, v_cond, t, draws.dropped, **guide)
    u, du_dt = mean_velocity_and_derivative(net_params, z, t, r, draws.labels, v_g, **dropout)
    return u, target(v_g, du_dt, t, r)

  def split(net_params, z, v, t, r, y, draws, **dropout):
    """Ours: the JVP on the r != t rows only; v_cond of the r = t rows is their own forward."""
    parts = lambda a: split_rows(a, share)
    (z_e, z_n), (v_e, v_n), (t_e, t_n), (r_n, y_e, y_n) = (
        parts(z), parts(v), parts(t), (parts(r)[1], *parts(y)))
    (in_e, in_n), (drop_e, drop_n) = parts(draws.labels), parts(draws.dropped)
    outputs = []
    if t_e.size:
      u_e = average.velocity(apply_fn, net_params, z_e, t_e, t_e, in_e, **dropout)
      v_g_e = v_e
      if guided:
        v_uncond = velocity_at(net_params, z_e, t_e, jnp.full_like(y_e, null_label), **dropout)
        v_g_e = guided_velocity(v_e, v_uncond, jax.lax.stop_gradient(u_e), t_e, drop_e, **guide)
      outputs.append((u_e, jax.lax.stop_gradient(v_g_e)))
    if t_n.size:
      v_g_n = v_n
      if guided:
        if options.kappa:  # one doubled batch: unconditional rows, then conditional ones
          both = velocity_at(net_params, jnp.concatenate([z_n, z_n]), jnp.concatenate([t_n, t_n]),
                             jnp.concatenate([jnp.full_like(y_n, null_label), y_n]), **dropout)
          v_uncond, v_cond = jnp.split(both, 2)
        else:
          v_uncond, v_cond = velocity_at(net_params, z_n, t_n, jnp.full_like(y_n, null_label),
                                         **dropout), None
        v_g_n = guided_velocity(v_n, v_uncond, v_cond, t_n, drop_n, **guide)
      u_n, du_dt = mean_velocity_and_derivative(net_params, z_n, t_n, r_n, in_n, v_g_n, **dropout)
      outputs.append((u_n, target(v_g_n, du_dt, t_n, r_n)))
    if len(outputs) == 1:
      return outputs[0]
    (u_e, tgt_e), (u_n, tgt_n) = outputs
    return merge_rows(u_e, u_n, share), merge_rows(tgt_e, tgt_n, share)

  step = full_batch if options.full_batch_jvp else split

  def example_losses(net_params, x, labels, draws: Draws, **dropout):
    t, r, schedule = draws.t, draws.r, schedules.get(cfg.schedule)
    z = parameterization.interpolate(x, draws.noise, t, schedule)
    v = parameterization.from_x_eps("velocity", x, draws.noise, t, schedule)  # e - x
    u, u_tgt = step(net_params, z, v, t, r, labels, draws, **dropout)
    error = _sum_over_elements(jnp.square(u - u_tgt))
    return {"loss": adaptive_weighting(error, options.adaptive_p, options.adaptive_c),
            "error": error, "v_error": _sum_over_elements(jnp.square(u - v))}

  return example_losses


def check(config) -> None:
  """Fail before compiling on settings MeanFlow cannot train with (choices: objectives.RULES)."""
  cfg = config.objective
  if not config.model.second_time_embedder:
    raise ValueError("objective.name='meanflow' conditions the network on t and on h = t - r: "
                     "set model.second_time_embedder=True")
  if cfg.schedule != "rectified_flow":
    raise ValueError(f"objective.schedule={cfg.schedule!r}: MeanFlow is defined on the linear "
                     "path z_t = (1 - t)·x + t·e: set objective.schedule='rectified_flow'")
  row_layout(cfg.meanflow.share_r_equals_t)
  options = cfg.meanflow
  if config.data.num_classes == 0 and (options.omega != 1.0 or options.kappa != 0.0):
    raise ValueError(f"objective.meanflow.omega={options.omega}, kappa={options.kappa}: an "
                     "unconditional run (data.num_classes=0) has no condition to guide toward: "
                     "set omega=1.0 and kappa=0.0")
  if config.sampling.guidance_scale != 1.0:
    raise ValueError(f"sampling.guidance_scale={config.sampling.guidance_scale}: MeanFlow trains "
                     "its guidance in (objective.meanflow.omega, kappa) and samples without it: "
                     "set sampling.guidance_scale=1.0")


def describe(config) -> AverageVelocity:
  return AverageVelocity(schedules.get(config.objective.schedule))


def objective(config, draw_fn, example_losses, metrics, description):
  """The objective's parts (objectives.Objective) from a method's draws and per-example losses:
  loss(params, batch, rng, **inputs) = (batch mean of 'loss', {'loss' and the batch mean of each
  of `metrics`}), the keyword inputs the trainer hands over (pMF's frozen feature networks)
  passed on to example_losses; the description; the row layout's group size. Shared by
  MeanFlow, iMF and pMF."""

  def loss(params, batch, rng, **inputs):
    x, labels = batch["image"], batch["label"]
    draws = draw_fn(rng, x, labels, config)
    losses = example_losses(params["net"], x, labels, draws, **flow.dropout_kwargs(rng, config),
                            **inputs)
    value = jnp.mean(losses["loss"])
    return value, {"loss": value, **{name: jnp.mean(losses[name]) for name in metrics}}

  group_size, _ = row_layout(section(config).share_r_equals_t)
  return dict(loss=loss, description=description, group_size=group_size)


def build(config, apply_fn):
  check(config)
  return objective(config, draw, make_example_losses(config, apply_fn), ("error", "v_error"),
                   describe(config))

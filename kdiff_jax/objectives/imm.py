"""Inductive Moment Matching (Zhou, Ermon, Song 2025, arXiv 2503.07565; docs/objectives/imm.md).

A few-step generator trained from scratch. Per group of M particles (independent (x, n, y)
draws; n ~ N(0, sigma_d^2 I)) and one time triple eps <= s <= r < t <= T per group:

  x_t = alpha_t·x + sigma_t·n,   x_r = alpha_r·x + sigma_r·n           (the same x and n)
  y_t = f_{s,t}(x_t)                                 online pass: gradients, dropped labels
  y_r = stop_gradient(f_{s,r}(x_r))                  target pass: current weights, float32
  loss = mean over groups of w(s,t)·MMD^2(y_t, y_r)  (V-statistic over all M x M pairs, Eq. 67;
                                                     or the unbiased U-statistic, `group_mmd2`)

with t ~ p(t) on [eps, T] = [objective.t_min, objective.t_max], s ~ U(eps, t) and r(s, t) a
constant decrement in eta = sigma/alpha (`intermediate_time`). The network G sees
c_in(t)·x_t, t and s (or the stride t - s); the one-step map f_{s,t}(x_t) = c_skip·x_t + c_out·G
is `map_coefficients`. Kernels are Laplace (the paper's) or RBF, with a scale proportional to
|c_out(s,t)|; the weighting is Eq. 13 (`weight`). Kernel and weight math run in float32.
Particle groups are consecutive rows of the batch: rows g·M .. g·M + M - 1 form group g, so the
objective's `group_size` = M keeps every group whole on one device. The trained network is a
`OneStepMap`, which the loss and the samplers (pushforward, restart) share.
"""
import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections

from kdiff_jax import parameterization, samplers, schedules
from kdiff_jax.objectives import flow
from kdiff_jax.rules import boolean, number, one_of

F_TYPES = ("euler_fm", "simple_edm", "identity")
KERNELS = ("laplace", "rbf")
ESTIMATORS = ("v", "u")
TIME_CONDITIONINGS = ("identity", "stride")


def defaults():
  """objective.imm (docs/objectives/imm.md): sigma_d = objective.noise_std (0.5), [eps, T] =
  [objective.t_min, objective.t_max]; needs model.second_time_embedder = True."""
  return ml_collections.ConfigDict(dict(
      group_size=4,               # M particles per group, one (s, r, t) per group
      k=12,                       # r(s,t): eta decrement (eta(T) - eta(eps))/2^k (ImageNet 12, CIFAR 15)
      delta=0.0,                  # minimum gap t - r (1e-4 when training in low precision)
      f_type="euler_fm",          # euler_fm | simple_edm | identity: the one-step map f_{s,t}
      kernel="laplace",           # laplace | rbf
      bandwidth=1.0,              # c, the kernel scale multiple (1: the paper): laplace exp(-d/(c |c_out| D)),
                                  # rbf exp(-d^2/(2 h^2)) with h = c |c_out(s,t)| sqrt(D)
      estimator="v",              # MMD^2 per group: v (all M x M pairs, the paper) | u (pairs i != j, unbiased)
      a=1.0,                      # w(s,t) = 1/2 sigmoid(b - lambda_t) (-dlambda_t/dt) alpha_t^a / (alpha_t^2 + sigma_t^2)
      b=4.0,
      time_conditioning="identity",  # the second time input: identity (s) | stride (t - s)
      drop_target_labels=False,   # also give the target pass the dropped labels
      target_full_precision=True,  # target pass in float32 whatever model.compute_dtype
  ))


RULES = {
    "group_size": number(1, integer=True),
    "k": number(0, integer=True),
    "delta": number(0, 1, high_open=True),
    "f_type": one_of(*F_TYPES),
    "kernel": one_of(*KERNELS),
    "bandwidth": number(0, low_open=True),
    "estimator": one_of(*ESTIMATORS),
    "a": number(0),
    "b": number(),
    "time_conditioning": one_of(*TIME_CONDITIONINGS),
    "drop_target_labels": boolean(),
    "target_full_precision": boolean(),
}

# Floor on the squared distance inside the Laplace kernel's square root: the V-statistic has
# distance-0 diagonal pairs, where d sqrt(u)/du is infinite (docs/objectives/imm.md, "The loss").
SQUARED_DISTANCE_FLOOR = 1e-8
# Floor on |c_out(s,t)| (the kernel scale): c_out = 0 when s = t, which float32 draws can hit.
KERNEL_SCALE_FLOOR = 1e-8


def intermediate_time(s, t, schedule, *, t_min, t_max, k, delta):
  """r(s,t) = max(s, min(t - delta, eta^-1(max(eta_t - eps, eta_min)))), eps = (eta_max - eta_min)/2^k.

  IMM Sec. 4 / App. C: a constant decrement eps in eta = sigma/alpha, with eta_min = eta(t_min)
  and eta_max = eta(t_max); delta is a minimum gap t - r (1e-4 for low-precision training).
  """
  eta_min, eta_max = float(schedule.eta(float(t_min))), float(schedule.eta(float(t_max)))
  decrement = (eta_max - eta_min) / 2.0**k
  eta_r = jnp.maximum(schedule.eta(t) - decrement, eta_min)
  return jnp.maximum(s, jnp.minimum(t - delta, schedule.eta_inv(eta_r)))


def sample_times(rng, num_groups, objective_config):
  """(s, r, t), one triple per group: t ~ p(t) on [t_min, t_max] (flow.sample_time), s ~ U(t_min, t), r = r(s,t)."""
  cfg = objective_config
  rng_t, rng_s = jax.random.split(rng)
  t = flow.sample_time(rng_t, num_groups, cfg)
  s = cfg.t_min + (t - cfg.t_min) * jax.random.uniform(rng_s, (num_groups,), jnp.float32)
  r = intermediate_time(s, t, schedules.get(cfg.schedule), t_min=cfg.t_min, t_max=cfg.t_max,
                        k=cfg.imm.k, delta=cfg.imm.delta)
  return s, r, t


def map_coefficients(f_type, s, t, schedule, sigma_d):
  """(c_skip, c_out) of the one-step map f_{s,t}(x_t) = c_skip·x_t + c_out·G (IMM App. C.6).

  euler_fm:   f = x_t - (t - s)·sigma_d·G
  simple_edm: f = (alpha_t·alpha_s + sigma_t·sigma_s)/(alpha_t^2 + sigma_t^2)·x_t
                  - (alpha_s·sigma_t - alpha_t·sigma_s)/sqrt(alpha_t^2 + sigma_t^2)·sigma_d·G
  identity:   f = DDIM(x_t, G, s, t) (parameterization.ddim, linear in x_t and G).
  Every map is the identity at s = t (c_skip = 1, c_out = 0).
  """
  if f_type == "euler_fm":
    return jnp.ones_like(t), -(t - s) * sigma_d
  if f_type == "simple_edm":
    alpha_s, sigma_s = schedule.alpha(s), schedule.sigma(s)
    alpha_t, sigma_t = schedule.alpha(t), schedule.sigma(t)
    norm = alpha_t**2 + sigma_t**2
    return ((alpha_t * alpha_s + sigma_t * sigma_s) / norm,
            -(alpha_s * sigma_t - alpha_t * sigma_s) / jnp.sqrt(norm) * sigma_d)
  if f_type == "identity":
    return (parameterization.ddim(1.0, 0.0, s, t, schedule),
            parameterization.ddim(0.0, 1.0, s, t, schedule))
  raise ValueError(f"objective.imm.f_type={f_type!r}: allowed values are {list(F_TYPES)}")


def one_step_map(f_type, x_t, output, s, t, schedule, sigma_d):
  """f_{s,t}(x_t) = c_skip(s,t)·x_t + c_out(s,t)·G for the network output G (`map_coefficients`)."""
  c_skip, c_out = map_coefficients(f_type, s, t, schedule, sigma_d)
  return (parameterization.broadcast_time(c_skip, x_t) * x_t
          + parameterization.broadcast_time(c_out, x_t) * output)


def input_scale(t, schedule, sigma_d):
  """c_in(t) = 1/(sigma_d·sqrt(alpha_t^2 + sigma_t^2)): the network sees c_in·x_t (IMM App. C.6)."""
  return 1.0 / (sigma_d * jnp.sqrt(schedule.alpha(t)**2 + schedule.sigma(t)**2))


def weight(t, schedule, a, b):
  """w(s,t) = 1/2·sigmoid(b - lambda_t)·(-d lambda_t/dt)·alpha_t^a/(alpha_t^2 + sigma_t^2) (IMM Eq. 13).

  lambda_t = 2·log(alpha_t/sigma_t) is the log-SNR (twice schedule.lambda_); for rectified flow
  -d lambda/dt = 2/(t(1 - t)). As t -> 0 the weight -> 0 (sigmoid -> 0 faster than -d lambda/dt
  grows); t is floored at the smallest normal float32 so that float32 gives 0·finite, not 0·inf.
  """
  t = jnp.maximum(t, jnp.finfo(jnp.float32).tiny)
  log_snr = 2.0 * schedule.lambda_(t)
  alpha, sigma = schedule.alpha(t), schedule.sigma(t)
  return (0.5 * jax.nn.sigmoid(b - log_snr) * (-2.0 * schedule.lambda_dot(t))
          * alpha**a / (alpha**2 + sigma**2))


def kernel_matrix(squared_distance, scale, dim, kernel, bandwidth):
  """k(a, b) from the squared distance, with the per-group scale |c_out(s,t)| (broadcasts).

  laplace: exp(-sqrt(max(|a - b|^2, 1e-8))/(c·scale·D))   (IMM App. C with c = 1; D = elements
           per sample)
  rbf:     exp(-|a - b|^2/(2·h^2)),  h = c·scale·sqrt(D)
  c = bandwidth (1: the paper). The paper's scale makes the Laplace kernel broad against image
  distances (|a - b| ~ sqrt(D) << scale·D), where the MMD^2 is ~ an energy distance over scale·D;
  in a few dimensions the same c is narrow for short jumps.
  """
  if kernel == "laplace":
    distance = jnp.sqrt(jnp.maximum(squared_distance, SQUARED_DISTANCE_FLOOR))
    return jnp.exp(-distance / (bandwidth * scale * dim))
  if kernel == "rbf":
    h = bandwidth * scale * jnp.sqrt(float(dim))
    return jnp.exp(-squared_distance / (2.0 * h**2))
  raise ValueError(f"objective.imm.kernel={kernel!r}: allowed values are {list(KERNELS)}")


def group_mmd2(y_t, y_r, scale, *, kernel, bandwidth=1.0, estimator="v"):
  """MMD^2 per group of y_t against y_r, from the M x M blocks K_tt, K_rr, K_tr of the Gram matrix.

  v: mean K_tt + mean K_rr - 2·mean K_tr over all pairs, diagonal included (IMM Eq. 67).
  u: the same means over the pairs i != j only (Gretton et al. 2012, Eq. 3, MMD^2_u), unbiased:
     E[MMD^2_u] = MMD^2(P_t, P_r). The V-statistic's expectation adds
     (1/M)·(2 - E K(y_t, y_t') - E K(y_r, y_r')) - (2/M)·(E K(y_t^i, y_r^i) - E K(y_t, y_r'))
     (the second term from the paired particles, which share x and n): its first part is smallest
     for a concentrated y_t, so with few particles its minimiser is narrower than the target.
  y_t, y_r: [G, M, ...] float32 particles; scale: [G] kernel scales. Distances are taken from
  differences (no |a|^2 + |b|^2 - 2ab cancellation). MMD^2_u can be negative, and trains worse
  on the 2-D toys (benchmarks/imm_toy.py): the paired terms carry much of the signal.
  """
  groups, particles = y_t.shape[:2]
  y = jnp.concatenate([y_t, y_r], axis=1).reshape(groups, 2 * particles, -1)
  squared_distance = jnp.sum(jnp.square(y[:, :, None] - y[:, None, :]), axis=-1)
  gram = kernel_matrix(squared_distance, scale[:, None, None], y.shape[-1], kernel, bandwidth)
  m = particles
  blocks = gram[:, :m, :m], gram[:, m:, m:], gram[:, :m, m:]
  if estimator == "v":
    k_tt, k_rr, k_tr = (jnp.mean(block, axis=(1, 2)) for block in blocks)
  elif estimator == "u":
    off_diagonal_mean = lambda block: ((jnp.sum(block, axis=(1, 2))
                                        - jnp.trace(block, axis1=1, axis2=2)) / (m * (m - 1)))
    k_tt, k_rr, k_tr = (off_diagonal_mean(block) for block in blocks)
  else:
    raise ValueError(f"objective.imm.estimator={estimator!r}: allowed values are {list(ESTIMATORS)}")
  return k_tt + k_rr - 2.0 * k_tr


@dataclasses.dataclass(frozen=True)
class OneStepMap:
  """The trained IMM network as the one-step map f_{s,t}(x_t) = c_skip·x_t + c_out·G.

  G = net(c_in(t)·x_t, t, labels, s) with s the target time ('identity') or the stride t - s
  ('stride'); c_in, c_skip, c_out from the schedule, f_type and sigma_d (`input_scale`,
  `map_coefficients`). Guidance acts on G, between `network` and `map`.
  """

  schedule: schedules.Schedule
  f_type: str
  time_conditioning: str
  sigma_d: float

  def network(self, apply_fn, net_params, x_t, s, t, labels, full_precision=False, **dropout):
    """G = net(c_in(t)·x_t, t, labels, s or t - s), float32; s, t: [B]; dropout: a training
    pass's flow.dropout_kwargs."""
    c_in = parameterization.broadcast_time(input_scale(t, self.schedule, self.sigma_d), x_t)
    second_time = t - s if self.time_conditioning == "stride" else s
    output = apply_fn(net_params, c_in * x_t, t, labels, second_time,
                      full_precision=full_precision, **dropout)
    return output.astype(jnp.float32)

  def map(self, x_t, output, s, t):
    """f_{s,t}(x_t) = c_skip(s,t)·x_t + c_out(s,t)·G (`one_step_map`)."""
    return one_step_map(self.f_type, x_t, output, s, t, self.schedule, self.sigma_d)

  # pushforward or restart (samplers/imm.py), guidance on G.
  methods: ClassVar[tuple] = samplers.imm.METHODS
  torch_sampler: ClassVar[str] = "imm"   # export/torch_sampling.sample_imm

  def check_sampling(self, config) -> None:
    del config   # every guidance scale and interval acts on G

  def time_grid(self, config):
    return flow.sampling_times(config, self.schedule)

  def plan(self, config):
    return samplers.imm.plan(self.schedule, self.time_grid(config), config.sampling.method,
                             self.sigma_d)

  def sampler(self, config, apply_fn):
    """x_{t_end} by pushforward or restart through the one-step map."""
    chosen = config.sampling

    def sample(params, noise, labels, key):
      raw_fn = lambda x_t, s_, t, y: self.network(apply_fn, params["net"], x_t, s_, t, y)
      return samplers.imm.sample(
          raw_fn, self.map, noise, labels, schedule=self.schedule, method=chosen.method,
          num_steps=chosen.num_steps, grid=chosen.grid, t_start=chosen.t_start,
          t_end=chosen.t_end, noise_std=self.sigma_d, key=key,
          null_label=config.data.num_classes, guidance_scale=chosen.guidance_scale,
          guidance_interval=tuple(chosen.guidance_interval), **flow.configured_options(config))
    return sample

  def export(self, config, params_by_weights) -> dict:
    del config, params_by_weights
    return dict(imm=dict(f_type=self.f_type, time_conditioning=self.time_conditioning))


def check(config):
  """Fail before compiling on settings IMM cannot train with (choices: objectives.RULES)."""
  cfg = config.objective
  if not config.model.second_time_embedder:
    raise ValueError("objective.name='imm' conditions the network on t and on s (or t - s): "
                     "set model.second_time_embedder=True")
  if cfg.imm.estimator == "u" and cfg.imm.group_size < 2:
    raise ValueError(f"objective.imm.estimator='u' needs pairs i != j: objective.imm.group_size="
                     f"{cfg.imm.group_size} must be >= 2")
  schedule = schedules.get(cfg.schedule)
  with np.errstate(divide="ignore"):
    eta_max = float(schedule.eta(np.float64(cfg.t_max)))
  if not eta_max < float("inf"):
    raise ValueError(f"objective.t_max={cfg.t_max}: IMM needs a finite eta(T) = sigma/alpha "
                     "(the paper's T = 0.994)")


def describe(config) -> OneStepMap:
  cfg = config.objective
  return OneStepMap(schedules.get(cfg.schedule), cfg.imm.f_type, cfg.imm.time_conditioning,
                    cfg.noise_std)


def make_group_losses(config, apply_fn):
  """group_losses(net_params, x, n, labels, target_labels, s, r, t, **dropout) -> (w·MMD^2,
  MMD^2), each [G].

  x, n: [G·M, ...] with group g in rows g·M .. g·M + M - 1; labels feed the online pass (already
  dropped for guidance), target_labels the target pass; s, r, t: [G]; dropout: the step's
  flow.dropout_kwargs, one key for both passes (the target pass drops the same units).
  """
  cfg = config.objective
  imm = cfg.imm
  schedule = schedules.get(cfg.schedule)
  one_step = describe(config)
  group_size = imm.group_size

  def mapped(net_params, x_t, s, t, labels, full_precision, **dropout):
    output = one_step.network(apply_fn, net_params, x_t, s, t, labels, full_precision, **dropout)
    return one_step.map(x_t, output, s, t)

  def group_losses(net_params, x, n, labels, target_labels, s, r, t, **dropout):
    per_particle = lambda time: jnp.repeat(time, group_size)
    s_p, r_p, t_p = per_particle(s), per_particle(r), per_particle(t)
    x_t = parameterization.interpolate(x, n, t_p, schedule)
    x_r = parameterization.interpolate(x, n, r_p, schedule)
    y_t = mapped(net_params, x_t, s_p, t_p, labels, False, **dropout)
    y_r = jax.lax.stop_gradient(
        mapped(net_params, x_r, s_p, r_p, target_labels, imm.target_full_precision, **dropout))
    grouped = lambda y: y.reshape((-1, group_size) + y.shape[1:])
    _, c_out = map_coefficients(imm.f_type, s, t, schedule, cfg.noise_std)
    scale = jnp.maximum(jnp.abs(c_out), KERNEL_SCALE_FLOOR)
    mmd2 = group_mmd2(grouped(y_t), grouped(y_r), scale, kernel=imm.kernel,
                      bandwidth=imm.bandwidth, estimator=imm.estimator)
    return weight(t, schedule, imm.a, imm.b) * mmd2, mmd2

  return group_losses


def build(config, apply_fn):
  check(config)
  cfg = config.objective
  group_size = cfg.imm.group_size
  group_losses = make_group_losses(config, apply_fn)

  def loss(params, batch, rng):
    x, labels = batch["image"], batch["label"]
    if x.shape[0] % group_size:
      raise ValueError(f"batch of {x.shape[0]} is not a multiple of objective.imm.group_size="
                       f"{group_size}")
    rng_time, rng_n, rng_y = jax.random.split(rng, 3)
    s, r, t = sample_times(rng_time, x.shape[0] // group_size, cfg)
    n = cfg.noise_std * jax.random.normal(rng_n, x.shape, jnp.float32)
    online_labels = flow.drop_labels(rng_y, labels, cfg.label_dropout, config.data.num_classes)
    target_labels = online_labels if cfg.imm.drop_target_labels else labels
    weighted, mmd2 = group_losses(params["net"], x, n, online_labels, target_labels, s, r, t,
                                  **flow.dropout_kwargs(rng, config))
    value = jnp.mean(weighted)
    return value, {"loss": value, "mmd2": jnp.mean(mmd2)}

  return dict(loss=loss, description=describe(config), group_size=group_size,
              full_precision_pass=config.objective.imm.target_full_precision)

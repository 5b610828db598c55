"""Terminal Velocity Matching (Zhou, Song et al., Luma AI; lumalabs/tvm `training/loss.py`,
`training/wrapper.py`; docs/objectives/tvm.md): a one- to few-step generator, IMM's successor,
trained from scratch.

On rectified flow (t = 0 data, t = 1 noise; x data, e ~ N(0, I)) the network F(x, t, h, y, beta)
takes the time t, the stride h = t - s to the terminal time s < t, the label and the guidance
input beta = 1/cfg, and defines the map and its s-derivative

  f_{s,t}(x) = x + (s - t)·a·F(x, t, t - s)
  df/ds      = a·(F + (s - t)·dF/ds),    dF/ds = jvp of s -> F(x, t, t - s) along ds = 1

(the official code takes the JVP of (x, t, s) -> F with tangents (0, 0, 1); a JVP in s alone is
the same derivative). w = 1/beta is the CFG weight of the flow-matching target, always; the output
scale a is w with `scale_output` (the official do_scale_param, on for im256_w2), else 1. Per
example, with y_t = (1 - t)·x + t·e, y_s' = (1 - s')·x + s'·e and the teacher T (an EMA of the
online weights, decay `teacher_decay`):

  terminal = mean((beta·(df/ds - a·T(f_{s,t}(y_t), s, h = 0, y, beta)))^2), 0 where s ~= t
  fm       = mean((beta·(a·F(y_s', s', h = 0, y, beta) - v))^2),
             v = w·(e - x) + (1 - w)·T(y_s', s', h = 0, null, 1)
  loss     = mean over examples of terminal + fm

The teacher's two evaluations are one pass on the doubled batch and a constant for the gradient
(the official code runs it under no_grad: its input f_{s,t}(y_t) carries no gradient either). The
gradient of df/ds flows through the JVP (reverse over forward; the official detach_jvp = False,
`objective.tvm.detach_jvp`).

Draws per example (`sample_draws`): the gap l = sigmoid(N(gap_mean, gap_std)); s logit-normal
N(s_mean, s_std) truncated to s <= 1 - l by the inverse CDF of that normal; t = min(s + l, 1);
s' = sigmoid(N(s_mean, s_std)) independently; beta = 1/cfg (fixed), 1/U[min_cfg, max_cfg]
(range) or U(0, 1] (uniform); labels replaced by the null label with probability
objective.label_dropout, and those rows get beta = 1.

The official loss replaces NaN losses by 0; here a non-finite loss stops the run (or rolls back)
as for every objective. Its random beta is torch.rand, [0, 1); here (0, 1], as beta = 0 would make
w infinite. The trained network is a `TerminalVelocity`, sampled by samplers/tvm.py.
"""
import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr, ndtri
import ml_collections

from kdiff_jax import parameterization, samplers, schedules
from kdiff_jax.objectives import flow
from kdiff_jax.rules import boolean, number, one_of

CFG_DRAWS = ("fixed", "range", "uniform")

# The loss differentiates the network with jax.jvp (objectives.check: attention 'xla').
JVP = True


def defaults():
  """objective.tvm: rectified flow, a DiT with model.second_time_embedder (h = t - s) and
  model.guidance_embedder (beta = 1/cfg); labels dropped with objective.label_dropout (those rows
  get beta = 1)."""
  return ml_collections.ConfigDict(dict(
      gap_mean=-0.8,              # gap l = t - s: sigmoid(N(gap_mean, gap_std))
      gap_std=1.0,
      s_mean=-0.4,                # s: logit-normal N(s_mean, s_std) truncated to s <= 1 - l; s' untruncated
      s_std=1.0,
      cfg_draw="fixed",           # beta = 1/cfg: fixed (cfg) | range (1/U[min_cfg, max_cfg]) | uniform (U(0, 1])
      cfg=2.0,
      min_cfg=1.0,
      max_cfg=4.0,
      scale_output=True,          # output scale a = 1/beta (the official do_scale_param); False: a = 1
      teacher_decay=0.99,         # the teacher: an EMA of the online weights (not training.ema_decays)
      detach_jvp=False,           # True: no gradient through dF/ds (the official option; off in its configs)
  ))


RULES = {
    "gap_mean": number(),
    "gap_std": number(0, low_open=True),
    "s_mean": number(),
    "s_std": number(0, low_open=True),
    "cfg_draw": one_of(*CFG_DRAWS),
    "cfg": number(0, low_open=True),
    "min_cfg": number(0, low_open=True),
    "max_cfg": number(0, low_open=True),
    "scale_output": boolean(),
    "teacher_decay": number(0, 1, high_open=True),
    "detach_jvp": boolean(),
}


class Draws(NamedTuple):
  """One batch's randomness, each [B] except noise (x's shape); labels already dropped."""
  gap: jax.Array        # l
  s: jax.Array          # terminal time, s <= 1 - l
  t: jax.Array          # min(s + l, 1)
  s_prime: jax.Array    # the flow-matching time s'
  beta: jax.Array       # 1/cfg, 1 on dropped rows
  noise: jax.Array      # e
  labels: jax.Array     # the online (and teacher's conditional) labels, null where dropped


@dataclasses.dataclass(frozen=True)
class TerminalVelocity:
  """The trained TVM network as the map f_{s,t}(x) = x + (s - t)·a·F(x, t, t - s, y, beta).

  Sampling with cfg feeds beta = 1/cfg and, with `scale_output`, a = cfg.
  """

  schedule: schedules.Schedule
  scale_output: bool

  # tvm (samplers/tvm.py): x <- x + (s - t)·a·F(x, t, t - s, y, beta = 1/sampling.guidance_scale).
  methods: ClassVar[tuple] = samplers.tvm.METHODS
  torch_sampler: ClassVar[str] = "tvm"   # export/torch_sampling.sample_tvm

  def network(self, apply_fn, net_params, x_t, t, h, labels, beta):
    """F(x_t, t, h = t - s, labels, beta), float32; t, h, beta: [B]."""
    return apply_fn(net_params, x_t, t, labels, h, guidance=beta).astype(jnp.float32)

  def check_sampling(self, config) -> None:
    """The guidance scale is the network's input beta = 1/cfg, on every step."""
    chosen = config.sampling
    if not chosen.guidance_scale > 0:
      raise ValueError(f"sampling.guidance_scale={chosen.guidance_scale}: TVM's network takes "
                       "beta = 1/cfg, so the guidance scale (cfg) must be > 0")
    if tuple(chosen.guidance_interval) != (0.0, 1.0):
      raise ValueError(f"sampling.guidance_interval={tuple(chosen.guidance_interval)}: TVM's "
                       "guidance is trained into every step; leave it at (0.0, 1.0)")

  def time_grid(self, config):
    return flow.sampling_times(config, self.schedule)

  def plan(self, config):
    return self.time_grid(config)

  def sampler(self, config, apply_fn):
    """x_{t_end} by the map f_{s,t} down the time grid, cfg = sampling.guidance_scale."""
    times, cfg = self.time_grid(config), config.sampling.guidance_scale

    def sample(params, noise, labels, key):
      del key  # deterministic
      network = lambda x, t, h, y, beta: self.network(apply_fn, params["net"], x, t, h, y, beta)
      return samplers.tvm.sample(network, noise, labels, times=times, cfg=cfg,
                                 scale_output=self.scale_output)
    return sample

  def export(self, config, params_by_weights) -> dict:
    """F(x, t, h = t - s, y, guidance=beta); f_{s,t}(x) = x + (s - t)·a·F, a = cfg if
    scale_output."""
    del config, params_by_weights
    return dict(tvm=dict(scale_output=self.scale_output))


def truncated_logit_normal(u, upper_logit, mean, std):
  """sigmoid(Phi^-1(u·Phi(upper_logit))), Phi the CDF of N(mean, std): a logit-normal draw
  conditioned on logit <= upper_logit (u ~ U[0, 1])."""
  return jax.nn.sigmoid(mean + std * ndtri(u * ndtr((upper_logit - mean) / std)))


def draw_beta(rng, batch_size, tvm):
  """beta = 1/cfg: fixed, 1/U[min_cfg, max_cfg] or U(0, 1]."""
  if tvm.cfg_draw == "fixed":
    return jnp.full((batch_size,), 1.0 / tvm.cfg, jnp.float32)
  u = jax.random.uniform(rng, (batch_size,), jnp.float32)
  if tvm.cfg_draw == "range":
    return 1.0 / (tvm.min_cfg + (tvm.max_cfg - tvm.min_cfg) * u)
  if tvm.cfg_draw == "uniform":
    return 1.0 - u   # (0, 1]: beta = 0 would make w = 1/beta infinite
  raise ValueError(f"objective.tvm.cfg_draw={tvm.cfg_draw!r}: allowed values are {list(CFG_DRAWS)}")


def sample_draws(rng, x, labels, objective_config, null_label) -> Draws:
  """The draws of one batch (module docstring). logit(1 - l) = -logit(l), taken exactly."""
  tvm = objective_config.tvm
  batch = x.shape[0]
  rng_gap, rng_u, rng_sp, rng_beta, rng_e, rng_y = jax.random.split(rng, 6)
  gap_logit = tvm.gap_mean + tvm.gap_std * jax.random.normal(rng_gap, (batch,), jnp.float32)
  gap = jax.nn.sigmoid(gap_logit)
  u = jax.random.uniform(rng_u, (batch,), jnp.float32)
  s = jnp.minimum(truncated_logit_normal(u, -gap_logit, tvm.s_mean, tvm.s_std), 1.0 - gap)
  t = jnp.minimum(s + gap, 1.0)
  s_prime = jax.nn.sigmoid(tvm.s_mean + tvm.s_std *
                           jax.random.normal(rng_sp, (batch,), jnp.float32))
  drop = jax.random.bernoulli(rng_y, objective_config.label_dropout, (batch,))
  beta = jnp.where(drop, 1.0, draw_beta(rng_beta, batch, tvm))
  noise = jax.random.normal(rng_e, x.shape, jnp.float32)
  return Draws(gap, s, t, s_prime, beta, noise, jnp.where(drop, null_label, labels))


def per_example_losses(apply_fn, net_params, teacher_params, x, draws: Draws, *, scale_output,
                       null_label, detach_jvp=False):
  """(terminal + fm, terminal, fm), each [B], from explicit draws (module docstring).

  apply_fn(params, x_t, t, labels, h, guidance=beta) is the network F; teacher_params the
  teacher's weights (its outputs are constants for the gradient). detach_jvp: no gradient
  through dF/ds (the official option, off in every released config).
  """
  s, t, s_prime, beta, e = draws.s, draws.t, draws.s_prime, draws.beta, draws.noise
  labels = draws.labels
  b = lambda v: parameterization.broadcast_time(v, x)
  def network(params, x_in, time, h, y, guidance):   # at least float32 (a bf16 model's output)
    out = apply_fn(params, x_in, time, y, h, guidance=guidance)
    return out.astype(jnp.promote_types(out.dtype, jnp.float32))
  w = 1.0 / beta
  a = w if scale_output else jnp.ones_like(beta)
  path = schedules.get("rectified_flow")   # y_t = (1 - t)·x + t·e, velocity e - x
  y_t = parameterization.interpolate(x, e, t, path)
  y_s_prime = parameterization.interpolate(x, e, s_prime, path)

  # F(y_t, t, t - s) and dF/ds: forward-mode in s, differentiated in reverse by the caller.
  F_ts, dF_ds = jax.jvp(lambda s_: network(net_params, y_t, t, t - s_, labels, beta),
                        (s,), (jnp.ones_like(s),))
  if detach_jvp:
    dF_ds = jax.lax.stop_gradient(dF_ds)
  f_st = y_t + b((s - t) * a) * F_ts
  df_ds = b(a) * (F_ts + b(s - t) * dF_ds)

  zeros = jnp.zeros_like(s)
  teacher = jax.lax.stop_gradient(network(
      teacher_params, jnp.concatenate([f_st, y_s_prime]), jnp.concatenate([s, s_prime]),
      jnp.concatenate([zeros, zeros]),
      jnp.concatenate([labels, jnp.full_like(labels, null_label)]),
      jnp.concatenate([beta, jnp.ones_like(beta)])))
  F_teacher, F_teacher_uncond = jnp.split(teacher, 2)
  F_s_prime = network(net_params, y_s_prime, s_prime, zeros, labels, beta)

  mean = lambda v: jnp.mean(v, axis=tuple(range(1, v.ndim)))
  # torch.isclose(s, t) with its defaults: the terminal loss is 0 where s ~= t.
  distinct = jnp.abs(s - t) > 1e-8 + 1e-5 * jnp.abs(t)
  terminal = jnp.where(distinct, mean(jnp.square(b(beta) * (df_ds - b(a) * F_teacher))), 0.0)
  velocity = parameterization.from_x_eps("velocity", x, e, s_prime, path)   # e - x
  v_target = b(w) * velocity + b(1.0 - w) * F_teacher_uncond
  fm = mean(jnp.square(b(beta) * (b(a) * F_s_prime - v_target)))
  return terminal + fm, terminal, fm


def check(config) -> None:
  """Fail before compiling on settings TVM cannot train with (choices: objectives.RULES)."""
  cfg, model = config.objective, config.model
  if cfg.schedule != "rectified_flow":
    raise ValueError(f"objective.schedule={cfg.schedule!r}: TVM's map x + (s - t)·a·F is on the "
                     "rectified-flow interpolant: set objective.schedule='rectified_flow'")
  if cfg.noise_std != 1.0:
    raise ValueError(f"objective.noise_std={cfg.noise_std}: TVM draws e ~ N(0, I): set 1.0")
  if (model.name not in ("dit", "mlp") or not model.second_time_embedder
      or not model.guidance_embedder):
    raise ValueError("objective.name='tvm' conditions a DiT (or the 2-D toys' MLP) on t, on "
                     "h = t - s and on beta = 1/cfg: set model.name='dit' (or 'mlp'), "
                     "model.second_time_embedder=True and model.guidance_embedder=True")
  if cfg.tvm.cfg_draw == "range" and not cfg.tvm.min_cfg <= cfg.tvm.max_cfg:
    raise ValueError(f"objective.tvm.min_cfg={cfg.tvm.min_cfg} must be <= "
                     f"objective.tvm.max_cfg={cfg.tvm.max_cfg}")


def describe(config) -> TerminalVelocity:
  return TerminalVelocity(schedules.get(config.objective.schedule),
                          config.objective.tvm.scale_output)


def build(config, apply_fn):
  check(config)
  cfg = config.objective
  null_label = config.data.num_classes

  def loss(params, batch, rng, teacher=None):
    """teacher: the teacher's weights (the train state's 'teacher'); None: the online weights
    themselves, the teacher at step 0 (shape-only callers)."""
    teacher = params if teacher is None else teacher
    draws = sample_draws(rng, batch["image"], batch["label"], cfg, null_label)
    total, terminal, fm = per_example_losses(
        apply_fn, params["net"], teacher["net"], batch["image"], draws,
        scale_output=cfg.tvm.scale_output, null_label=null_label,
        detach_jvp=cfg.tvm.detach_jvp)
    value = jnp.mean(total)
    return value, {"loss": value, "terminal": jnp.mean(terminal), "fm": jnp.mean(fm)}

  return dict(loss=loss, description=describe(config), teacher_decay=cfg.tvm.teacher_decay)

"""Training objectives: pure functions of (params, batch, rng), registered by name.

  objective = objectives.build(config, apply_fn)
  loss, metrics = objective.loss(params, batch, rng)

An `Objective` holds the loss, the initial values of any parameters it adds to the network's
(k-Diff's w_k; merged into `params` next to `params['net']`), its `group_size` (examples that
must stay together on one device: IMM's particle groups) and a `description` of what the
trained network is, which `kdiff_jax.sampling` turns into a sampler:

  flow.Denoiser     flow matching and k-Diff: the raw output is a `prediction` (x, eps, v,
                    velocity, score, or u_k with k-Diff's k(params, t)) on a schedule
  imm.OneStepMap    IMM: f_{s,t}(x_t) = c_skip·x_t + c_out·G(c_in·x_t, t, s) on a schedule
  meanflow.AverageVelocity  MeanFlow: u(z_t, r, t), one step z_r = z_t - (t - r)·u
  tvm.TerminalVelocity  TVM: f_{s,t}(x) = x + (s - t)·a·F(x, t, t - s, y, beta = 1/cfg)

An objective with a `teacher_decay` (TVM) trains against a teacher, an EMA of the online weights
with that decay that the trainer keeps in the train state (`state['teacher']`, updated every
step, checkpointed) and hands to the loss: `loss(params, batch, rng, teacher=...)`.

`describe(config)` gives the description from the config alone (the config check uses it to
match sampler and objective). The network is reached only through
`apply_fn(net_params, x_t, t, labels, s=None, full_precision=False)` (full_precision runs it in
float32 whatever model.compute_dtype says); objectives know nothing of meshes or samplers.
"""
import dataclasses
from typing import Any, Callable

from kdiff_jax import parameterization, schedules
from kdiff_jax.objectives import flow, imf, imm, kdiff, meanflow, tvm
from kdiff_jax.schema import boolean, interval, number, one_of

Denoiser = flow.Denoiser
OneStepMap = imm.OneStepMap
AverageVelocity = meanflow.AverageVelocity
TerminalVelocity = tvm.TerminalVelocity


@dataclasses.dataclass(frozen=True)
class Objective:
  loss: Callable[..., Any]
  description: Denoiser | OneStepMap | AverageVelocity | TerminalVelocity
  extra_params: dict = dataclasses.field(default_factory=dict)
  group_size: int = 1
  teacher_decay: float | None = None   # an EMA teacher of the online weights (module docstring)
  # The loss also runs the network with full_precision=True (IMM's target pass), so it must get
  # the stored float32 weights, not the ones cast once for the compute dtype (state.Model).
  full_precision_pass: bool = False


MODULES = {"flow": flow, "imm": imm, "kdiff": kdiff, "meanflow": meanflow, "tvm": tvm}
# The predictions a flow objective trains (u_k is k-Diff's, which sets it itself).
FLOW_PREDICTIONS = tuple(p for p in parameterization.PREDICTIONS if p != "u_k")

RULES = {
    "objective.name": one_of(*MODULES),
    "objective.schedule": one_of(*schedules.SCHEDULES),
    "objective.prediction": one_of(*FLOW_PREDICTIONS),
    "objective.loss_target": one_of(*FLOW_PREDICTIONS),
    "objective.time_sampling": one_of(*flow.TIME_SAMPLINGS),
    "objective.logit_normal_mean": number(),
    "objective.logit_normal_std": number(0, low_open=True),
    "objective.t_min": number(0, 1, high_open=True),
    "objective.t_max": number(0, 1, low_open=True),
    "objective.noise_std": number(0, low_open=True),
    "objective.label_dropout": number(0, 1, high_open=True),
    "objective.min_divisor": number(0),
    "objective.imm.group_size": number(1, integer=True),
    "objective.imm.k": number(0, integer=True),
    "objective.imm.delta": number(0, 1, high_open=True),
    "objective.imm.f_type": one_of(*imm.F_TYPES),
    "objective.imm.kernel": one_of(*imm.KERNELS),
    "objective.imm.bandwidth": number(0, low_open=True),
    "objective.imm.estimator": one_of(*imm.ESTIMATORS),
    "objective.imm.a": number(0),
    "objective.imm.b": number(),
    "objective.imm.time_conditioning": one_of(*imm.TIME_CONDITIONINGS),
    "objective.imm.drop_target_labels": boolean(),
    "objective.imm.target_full_precision": boolean(),
    "objective.kdiff.learnable": boolean(),
    "objective.kdiff.k_init": number(0, 1),
    "objective.kdiff.w_k_scale": number(0, low_open=True),
    "objective.kdiff.time_dependent": boolean(),
    "objective.meanflow.variant": one_of(*meanflow.VARIANTS),
    "objective.meanflow.share_r_equals_t": number(0, 1),
    "objective.meanflow.omega": number(0),
    "objective.meanflow.kappa": number(0, 1, high_open=True),
    "objective.meanflow.guidance_interval": interval(number(0, 1)),
    "objective.meanflow.adaptive_p": number(0),
    "objective.meanflow.adaptive_c": number(0, low_open=True),
    "objective.meanflow.full_batch_jvp": boolean(),
    "objective.meanflow.imf.s_max": number(0),
    "objective.meanflow.imf.cfg_beta": number(0),
    "objective.meanflow.imf.interval_split": number(0, 1, low_open=True, high_open=True),
    "objective.meanflow.imf.aux_v_head": boolean(),
    "objective.tvm.gap_mean": number(),
    "objective.tvm.gap_std": number(0, low_open=True),
    "objective.tvm.s_mean": number(),
    "objective.tvm.s_std": number(0, low_open=True),
    "objective.tvm.cfg_draw": one_of(*tvm.CFG_DRAWS),
    "objective.tvm.cfg": number(0, low_open=True),
    "objective.tvm.min_cfg": number(0, low_open=True),
    "objective.tvm.max_cfg": number(0, low_open=True),
    "objective.tvm.scale_output": boolean(),
    "objective.tvm.teacher_decay": number(0, 1, high_open=True),
    "objective.tvm.detach_jvp": boolean(),
}


def module(config):
  """The module of config's objective: MODULES[objective.name], or objectives/imf.py for
  MeanFlow's variant 'imf' (objective.meanflow.variant)."""
  cfg = config.objective
  if cfg.name == "meanflow" and cfg.meanflow.variant == "imf":
    return imf
  return MODULES[cfg.name]


def check(config) -> None:
  """[t_min, t_max] is an interval, and the named objective's own combinations hold."""
  cfg = config.objective
  if cfg.t_min >= cfg.t_max:
    raise ValueError(f"objective.t_min={cfg.t_min} must be < objective.t_max={cfg.t_max}")
  module(config).check(config)


def describe(config) -> Denoiser | OneStepMap | AverageVelocity | TerminalVelocity:
  """What a network trained with config.objective is (see the module docstring)."""
  return module(config).describe(config)


def build(config, apply_fn) -> Objective:
  name = config.objective.name
  if name not in MODULES:
    raise ValueError(f"objective.name={name!r}: allowed values are {sorted(MODULES)}")
  return Objective(**module(config).build(config, apply_fn))

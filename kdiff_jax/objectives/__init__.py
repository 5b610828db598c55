"""Training objectives, one module per method, registered by name.

  objective = objectives.build(config, apply_fn)
  loss, metrics = objective.loss(params, batch, rng)

A method is one module (or any object with these names), registered with
`objectives.register(name, method)`; the package registers flow, kdiff, imm, meanflow, imf,
pmf and tvm, and anyone may register another from outside:

  defaults()        optional: a ConfigDict, the fields of its config section objective.<name>
                    (gathered into schema.defaults() by `sections`)
  RULES             {field of its section: rules.Rule}, e.g. {"group_size": number(1, integer=True)}
  check(config)     its combinations, raising ValueError that names the field
  describe(config)  the description of the trained network (below)
  build(config, apply_fn)  dict(loss=..., description=..., and Objective's other fields)
  JVP               optional, True: the loss differentiates the network with jax.jvp, so the
                    network's attention must be model.attention='xla' (cuDNN's has no JVP rule)
  FEATURE_NETS      optional, True: build(config, apply_fn, feature_nets) also gets the module
                    of frozen feature nets (kdiff_jax.perceptual; pMF's perceptual terms)
  upgrade(saved)    optional: an older spelling of its config (a checkpoint's JSON dict)
                    rewritten to today's (`upgrade`)

An `Objective` holds the loss, the initial values of any parameters it adds to the network's
(k-Diff's w_k; merged into `params` next to `params['net']`), its `group_size` (examples that
must stay together on one device: IMM's particle groups) and a `description` of what the
trained network is. The description answers for itself (`Description`): the sampling methods
that fit it, its host plan, the sample function that kdiff_jax.sampling assembles from it, what
the export's JSON says about it, and the name of its PyTorch sampler. The package's:

  flow.Denoiser     flow matching and k-Diff: the raw output is a `prediction` (x, eps, v,
                    velocity, score, or u_k with k-Diff's k(params, t)) on a schedule
  imm.OneStepMap    IMM: f_{s,t}(x_t) = c_skip·x_t + c_out·G(c_in·x_t, t, s) on a schedule
  meanflow.AverageVelocity  MeanFlow: u(z_t, r, t), one step z_r = z_t - (t - r)·u
  imf.GuidedAverageVelocity  iMF and pMF: the same with guidance ω and its interval as network inputs
  tvm.TerminalVelocity  TVM: f_{s,t}(x) = x + (s - t)·a·F(x, t, t - s, y, beta = 1/cfg)

An objective with a `teacher_decay` (TVM) trains against a teacher, an EMA of the online weights
with that decay that the trainer keeps in the train state (`state['teacher']`, updated every
step, checkpointed) and hands to the loss: `loss(params, batch, rng, teacher=...)`. One with a
`frozen` loader (pMF's perceptual nets) gets its frozen weights as `loss(..., frozen=...)`.

`describe(config)` gives the description from the config alone (the config check uses it to
match sampler and objective). The network is reached only through
`apply_fn(net_params, x_t, t, labels, s=None, full_precision=False)` (full_precision runs it in
float32 whatever model.compute_dtype says); objectives know nothing of meshes.
"""
import dataclasses
from typing import Any, Callable, Protocol

from kdiff_jax import parameterization, schedules
from kdiff_jax.objectives import flow, imf, imm, kdiff, meanflow, pmf, tvm
from kdiff_jax.rules import number, one_of


class Description(Protocol):
  """What a trained network is, as sampling and export ask it (every description implements it).

  methods                 the sampling.method values that sample it
  check_sampling(config)  config.sampling's combinations it cannot sample (ValueError)
  time_grid(config)       the float64 times config.sampling steps through (the export's)
  plan(config)            the host-side plan of config.sampling (raises where it cannot run)
  sampler(config, apply_fn, plan) -> sample(params, noise, labels, key), x at sampling.t_end
  export(config, params_by_weights) -> its entries of the export JSON's 'objective'
  torch_sampler           the name of its sampler in export/torch_sampling.py's SAMPLERS, or
                          None where none samples it in PyTorch
  """

  methods: tuple
  torch_sampler: str | None

  def check_sampling(self, config) -> None: ...
  def time_grid(self, config) -> Any: ...
  def plan(self, config) -> Any: ...
  def sampler(self, config, apply_fn, plan) -> Callable: ...
  def export(self, config, params_by_weights: dict) -> dict: ...


@dataclasses.dataclass(frozen=True)
class Objective:
  loss: Callable[..., Any]
  description: Description
  extra_params: dict = dataclasses.field(default_factory=dict)
  group_size: int = 1
  teacher_decay: float | None = None   # an EMA teacher of the online weights (module docstring)
  # The loss also runs the network with full_precision=True (IMM's target pass), so it must get
  # the stored float32 weights, not the ones cast once for the compute dtype (state.Model).
  full_precision_pass: bool = False
  # Frozen feature nets the loss runs (pMF's perceptual losses): frozen() -> a pytree of host
  # arrays, frozen.shapes() -> their ShapeDtypeStructs (kdiff_jax/perceptual.py's Loader). The trainer places it on the mesh and hands it to the
  # loss as `frozen=` (a jit argument, outside the train state: never optimised nor checkpointed).
  frozen: Callable[[], Any] | None = None


# The predictions a flow objective trains (u_k is k-Diff's, which sets it itself).
FLOW_PREDICTIONS = tuple(p for p in parameterization.PREDICTIONS if p != "u_k")
REQUIRED = ("RULES", "check", "describe", "build")

# name -> the method (module); `register` adds to it.
MODULES = {}
# The rules of the fields every objective shares, then of each registered method's section.
RULES = {
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
}


def register(name: str, method) -> None:
  """Add the objective `name`: `method` is a module (or any object) with the names of the module
  docstring; its section's defaults join schema.defaults() and its RULES config.validate."""
  missing = [attribute for attribute in REQUIRED if not hasattr(method, attribute)]
  if missing:
    raise ValueError(f"objectives.register({name!r}, ...): the method lacks {missing}")
  if name in MODULES and MODULES[name] is not method:
    raise ValueError(f"objectives.register({name!r}, ...): {name!r} is registered already")
  MODULES[name] = method
  RULES["objective.name"] = one_of(*MODULES)
  RULES.update({f"objective.{name}.{field}": rule for field, rule in method.RULES.items()})


def sections() -> dict:
  """{name: the default ConfigDict of objective.<name>} of every method that has a section."""
  return {name: method.defaults() for name, method in MODULES.items()
          if hasattr(method, "defaults")}


def upgrade(saved: dict) -> dict:
  """A saved config (a checkpoint's JSON dict) with every method's older spelling rewritten."""
  for method in MODULES.values():
    if hasattr(method, "upgrade"):
      saved = method.upgrade(saved)
  return saved


def module(config):
  """The method of config's objective (MODULES[objective.name])."""
  name = config.objective.name
  if name not in MODULES:
    raise ValueError(f"objective.name={name!r}: allowed values are {sorted(MODULES)}")
  return MODULES[name]


def check(config) -> None:
  """[t_min, t_max] is an interval, a JVP objective's network has attention jax.jvp goes
  through, and the named objective's own combinations hold."""
  cfg = config.objective
  if cfg.t_min >= cfg.t_max:
    raise ValueError(f"objective.t_min={cfg.t_min} must be < objective.t_max={cfg.t_max}")
  method = module(config)
  if getattr(method, "JVP", False) and config.model.attention != "xla":
    raise ValueError(f"model.attention={config.model.attention!r} cannot be used with "
                     f"objective.name={cfg.name!r}: it differentiates the network "
                     "with jax.jvp, and cuDNN's attention has no JVP rule; set "
                     "model.attention='xla'")
  method.check(config)


def describe(config) -> Description:
  """What a network trained with config.objective is (see the module docstring)."""
  return module(config).describe(config)


def build(config, apply_fn, feature_nets=None) -> Objective:
  """The objective of config. feature_nets: the module of frozen feature networks
  (kdiff_jax.perceptual), handed to the build of a method with FEATURE_NETS (pMF's perceptual
  terms); objectives never import it, as it reaches the models."""
  method = module(config)
  if getattr(method, "FEATURE_NETS", False):
    return Objective(**method.build(config, apply_fn, feature_nets))
  return Objective(**method.build(config, apply_fn))


for _name, _method in (("flow", flow), ("imm", imm), ("kdiff", kdiff), ("meanflow", meanflow),
                       ("imf", imf), ("pmf", pmf), ("tvm", tvm)):
  register(_name, _method)

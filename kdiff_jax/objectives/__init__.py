"""Training objectives: pure functions of (params, batch, rng), registered by name.

An objective is an `Objective`: `loss(params, batch, rng) -> (loss, metrics)`, the initial
values of any parameters it adds to the network's (k-Diff's w_k; merged into `params` next to
`params['net']`), `sample(params, noise, labels, key) -> images`, the sampler that fits what
it trained (ODE samplers for flow / k-Diff, pushforward for IMM), and `group_size`: examples
that must stay together on one device (IMM's particle groups; the trainer checks that the
per-device batch is a multiple of it). The network is reached only through
`apply_fn(net_params, x_t, t, labels, s=None, full_precision=False)` (full_precision runs it
in float32 whatever model.compute_dtype says); objectives know nothing of meshes.
"""
import dataclasses
from typing import Any, Callable

from kdiff_jax.objectives import flow, imm, kdiff


@dataclasses.dataclass(frozen=True)
class Objective:
  loss: Callable[..., Any]
  sample: Callable[..., Any]
  extra_params: dict = dataclasses.field(default_factory=dict)
  group_size: int = 1


BUILDERS = {"flow": flow.build, "imm": imm.build, "kdiff": kdiff.build}


def build(config, apply_fn) -> Objective:
  name = config.objective.name
  if name not in BUILDERS:
    raise ValueError(f"objective.name={name!r}: allowed values are {sorted(BUILDERS)}")
  return Objective(**BUILDERS[name](config, apply_fn))

"""The network apart from training: build it, apply it, shard its weights, restore only those asked for.

  model = state.build_model(config)       # graphdef, abstract net params, logical specs, apply
  weights = state.Weights(config, mesh)   # model + objective + the params' abstract shardings
  params, step = weights.restore(workdir, use_ema=True)   # {'net': ..., **extra}, on `mesh`

The model is built abstractly (nnx.eval_shape): no parameter is allocated until it is placed
straight into its shardings. `apply(net_params, x_t, t, labels, s=None, full_precision=False,
dropout_rng=None, **conditioning)` runs the network functionally at the schedule's `network_time(t)` (t itself
except on DDPM's VP schedule, where the network sees DDPM's step index k at alphabar_k:
schedules.VP.network_time); full_precision=True runs its float32 build
whatever model.compute_dtype says (IMM's target pass); dropout_rng, given by the training passes
of a network with model.dropout > 0 (`flow.dropout_kwargs`), turns its dropout on.
`compute_weights(net_params)` gives the weights in the dtype the network computes with (the
train step casts them once per step). Sampling, evaluation and export read one set of weights
(an EMA or the raw ones) through `Weights.restore` and never build an optimizer.
"""
import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import PartitionSpec as P

from kdiff_jax import checkpoint, models, objectives, parallel, schedules


@dataclasses.dataclass(frozen=True)
class Model:
  """The network of a config, abstract: its graph, parameter shapes and logical axis names."""

  graphdef: Any
  abstract_net: dict      # pure dict of ShapeDtypeStructs
  logical_net: dict       # pure dict of PartitionSpecs of logical axis names
  apply: Callable[..., Any]
  compute_weights: Callable[[dict], dict]   # `compute_weights` below, for this model

  @property
  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_net))


def _abstract(config):
  with nnx.use_eager_sharding(False):
    abstract_model = nnx.eval_shape(lambda: models.build(config, nnx.Rngs(config.seed)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
  return graphdef, nnx.to_pure_dict(abstract_params), logical, _compute_casts(abstract_model)


def _compute_casts(abstract_model) -> dict:
  """{path in the pure params dict: dtype} of the weights that a Linear or Conv casts to its
  compute dtype on every call (flax promotes kernel and bias to `dtype`); the rest (norms, label
  tables, the float32 time embedders) are read as stored."""
  casts = {}
  for path, node in nnx.iter_graph(abstract_model):
    if isinstance(node, (nnx.Linear, nnx.Conv)) and node.dtype is not None \
        and np.dtype(node.dtype) != np.dtype(node.param_dtype):
      for name in ("kernel", "bias"):
        if getattr(node, name, None) is not None:
          casts[tuple(path) + (name,)] = np.dtype(node.dtype)
  return casts


def compute_weights(net_params: dict, casts: dict) -> dict:
  """The weights as the compute-dtype network reads them: each of `casts` in its compute dtype.

  The network's output is the same either way (the Linear layers cast to the same dtype when
  given float32). The train step casts once, before the loss (train_state.make_train_step), so
  when the loss calls the network more than once with gradient (MeanFlow's split step, iMF,
  TVM) each weight's gradients from the calls are summed in the compute dtype and reduced over
  the batch shards once; cast inside each call,
  every call's gradient is all-reduced, converted and only then summed, and XLA does not join
  reductions across the convert (benchmarks/RESULTS.md, "Few-step objectives on TPU slices").
  """
  if not casts:
    return net_params
  flat = traverse_util.flatten_dict(net_params)
  return traverse_util.unflatten_dict(
      {path: value.astype(casts[path]) if path in casts else value for path, value in flat.items()})


def build_model(config) -> Model:
  """The abstract model of config.model (and data shapes) with its apply function."""
  graphdef, abstract_net, logical_net, casts = _abstract(config)
  if config.model.compute_dtype == "float32":
    graphdef_f32 = graphdef
  else:
    full = config.copy_and_resolve_references()
    full.model.compute_dtype = "float32"
    graphdef_f32 = _abstract(full)[0]

  network_time = schedules.get(config.objective.schedule).network_time

  def apply(net_params, x_t, t, labels, s=None, full_precision=False, dropout_rng=None,
            **conditioning):
    net = nnx.merge(graphdef_f32 if full_precision else graphdef, net_params)
    t = network_time(t)
    if dropout_rng is not None:
      conditioning["dropout_rng"] = dropout_rng
    return net(x_t, t, labels, s, **conditioning)

  return Model(graphdef, abstract_net, logical_net, apply,
               lambda net_params: compute_weights(net_params, casts))


def init_net(config):
  """The network's initial parameters (a pure dict), for use inside a jitted init."""
  return nnx.to_pure_dict(nnx.state(models.build(config, nnx.Rngs(config.seed)), nnx.Param))


class Weights:
  """The parameters {'net': ..., **the objective's extra params} of a config on a mesh."""

  def __init__(self, config, mesh, model: Model | None = None, feature_nets=None):
    """feature_nets: kdiff_jax.perceptual where the loss will run (train_state.setup), for an
    objective with perceptual terms (objectives.build); sampling and export need none."""
    self.config = config
    self.mesh = mesh
    model = model or build_model(config)

    def apply(*args, **kwargs):
      with parallel.activations_on(mesh, config.mesh.rules):
        return model.apply(*args, **kwargs)

    self.model = dataclasses.replace(model, apply=apply)
    self.objective = objectives.build(config, self.model.apply, feature_nets=feature_nets)
    self.abstract = {"net": self.model.abstract_net,
                     **jax.eval_shape(lambda: self.objective.extra_params)}
    logical = {"net": self.model.logical_net,
               **jax.tree.map(lambda _: P(), self.objective.extra_params)}
    self.logical = logical  # the params' logical axis names (PartitionSpecs)
    self.shardings = parallel.tree_shardings(self.abstract, logical, mesh, config.mesh.rules)
    parallel.check_replicated(self.abstract, self.shardings, mesh, config.mesh.replicated_limit)

  def restore(self, workdir: str, *, use_ema: bool, step=None):
    """(params, step): with use_ema the weights of the EMA `checkpoint.sampling_ema` chooses
    (sampling.ema_halflife_kimg, else the first kept), else (or without EMA) the raw ones, of
    the checkpoint at `step` (default: the latest), in their shardings on this mesh."""
    abstract = checkpoint.abstract_with_shardings(self.abstract, self.shardings)
    ema = checkpoint.sampling_ema(self.config) if use_ema else None
    return checkpoint.restore_weights(workdir, abstract, ema, step)

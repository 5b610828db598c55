"""The train state: what a config builds before any step runs, the state's initial value and the step.

  setup = train_state.setup(config, devices)   # mesh, weights, optimizer, abstract state
  state = train_state.init_state(setup)         # created directly in its shardings
  train_step = train_state.make_train_step(setup)
  state, metrics = train_step(state, batch)

The train state is a plain pytree {step, params, opt_state, ema, rng}; params = {'net': the
model's parameters as a pure dict, **the objective's extra parameters}; ema = {key: an EMA of
params} for each of training.ema_halflives_kimg and training.ema_decays (`ema_betas`), sharded
like them and updated every step after the optimizer. An objective with a
`teacher_decay` (TVM) adds 'teacher': an EMA of params with that decay (sharded like them,
updated every step after the optimizer, checkpointed; never an evaluation EMA), handed to its
loss as `teacher=`. An objective with a `frozen` loader (pMF's perceptual nets) has its frozen
weights' shapes taken by `setup` (`Setup.abstract_frozen`) and the weights loaded at the step's
first call (`Setup.load_frozen`, host arrays; a resumed run reloads them from their files;
an ahead-of-time compile never loads them), replicated over the mesh (each batch shard runs the whole feature nets; they are
small beside the batch's activations) and passed to the jitted step as an argument, not baked
into the program; the loss gets them as `frozen=`. They are outside the train state: never
optimised, never checkpointed. The step's randomness
is fold_in(rng, step): a resumed run draws exactly what a straight run does. The training loop
(train.py), the ahead-of-time compiles (aot.py) and the import of released weights
(export/checkpoints.py) build their state here; nothing here runs a loop, samples or evaluates.
"""
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from kdiff_jax import checkpoint, config as config_lib, data, parallel, perceptual, state as state_lib

# The step's metric that names the first parameter whose gradient is not finite (its index among
# the leaves of params, -1 when all are finite): a diagnosis, not written to TensorBoard.
FIRST_NONFINITE_GRADIENT = "first_nonfinite_gradient"


@dataclasses.dataclass
class Setup:
  """Everything built from a config before any step runs."""
  config: Any
  mesh: jax.sharding.Mesh
  weights: state_lib.Weights
  optimizer: optax.GradientTransformation
  abstract_state: Any     # ShapeDtypeStructs carrying their shardings
  state_shardings: Any
  load_frozen: Any = None   # load_frozen() -> the objective's frozen weights (host arrays), or None
  abstract_frozen: Any = None   # their ShapeDtypeStructs, replicated over the mesh

  @property
  def objective(self):
    return self.weights.objective

  @property
  def model(self) -> state_lib.Model:
    return self.weights.model


def make_optimizer(opt_config, num_steps: int, matrices=None) -> optax.GradientTransformation:
  """optimizer.name's optimizer on the learning-rate schedule: linear warm-up, then constant or
  cosine decay; with optimizer.grad_clip_norm > 0 the gradients are first clipped to that
  global norm.

  adamw: AdamW (Loshchilov & Hutter 2019); weight decay applies to arrays with ndim >= 2 only,
  never to biases, norms or scalars such as k-Diff's w_k.
  muon: `optax.contrib.muon` as pixel MeanFlow's train state builds it (Lyy-iiis/pMF
  utils/trainstate_util.py: the learning rate and Adam's b2, optax's defaults otherwise):
  momentum 0.95 with Nesterov, 5 Newton-Schulz steps a·X + (b·XXᵀ + c·(XXᵀ)²)·X with (a, b, c)
  = (3.4445, -4.775, 2.0315) on the momentum scaled to unit Frobenius norm, times
  sqrt(max(1, fan_out / fan_in)); every other parameter goes to Adam (b1, b2, eps here, Nesterov,
  the same learning rate). `matrices` (`muon_matrices` of the params) says which parameters are
  matrices; None: those of exactly two dimensions.
  """
  lr, warmup = opt_config.learning_rate, opt_config.warmup_steps
  if opt_config.lr_schedule == "constant":
    schedule = optax.warmup_constant_schedule(0.0 if warmup else lr, lr, max(warmup, 1))
  else:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(num_steps, warmup + 1))
  if opt_config.name == "muon":
    optimizer = optax.contrib.muon(
        schedule, eps=opt_config.eps, adam_b1=opt_config.b1, adam_b2=opt_config.b2,
        muon_weight_dimension_numbers=matrices)
  else:
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    optimizer = optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                            weight_decay=opt_config.weight_decay, mask=decay_mask)
  if opt_config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(opt_config.grad_clip_norm), optimizer)
  return optimizer


def muon_matrices(params, logical):
  """For each parameter, the matrix Muon orthogonalises (reduction axis -2, output axis -1), or
  None where Adam updates it.

  A matrix is a parameter of exactly two dimensions, as optax's default rule and the pMF
  code have it: Linear kernels [in, out] and label tables [classes, width]; conv kernels (4-D),
  biases, norm scales and scalars go to Adam. So do the in-context tokens (`*_tokens`) and the
  position table (`pos_embed`) of the in-context DiTs: the official code stores them [1, n,
  width], so Muon never sees them, and ours stores them [n, width] (`is_sequence_table`). With
  model.scan_blocks the blocks' kernels carry a leading axis named 'layers' in `logical` (their
  logical axis names): each is one matrix per block, as without the scan.
  """
  dims = optax.contrib.MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)
  stacked = lambda spec: len(spec) > 0 and spec[0] == "layers"
  matrix = lambda path, p, spec: p.ndim - stacked(spec) == 2 and not is_sequence_table(path)
  return jax.tree_util.tree_map_with_path(
      lambda path, p, spec: dims if matrix(path, p, spec) else None, params, logical,
      is_leaf=lambda x: isinstance(x, P))


def is_sequence_table(path) -> bool:
  """Whether a parameter path names learned tokens or a position table ([n, width] here, [1, n,
  width] in the official in-context DiTs): a last key ending in '_tokens' or 'pos_embed'."""
  name = str(getattr(path[-1], "key", path[-1])) if path else ""
  return name.endswith("_tokens") or name == "pos_embed"


def setup(config, devices=None) -> Setup:
  """Validate the config, build mesh, model, objective, optimizer and the state's shardings."""
  config_lib.validate(config)
  mesh = parallel.make_mesh(config.mesh, devices)
  weights = state_lib.Weights(config, mesh, feature_nets=perceptual)
  parallel.check_batch(config.training.batch_size,
                       parallel.batch_sharding(mesh, config.mesh.rules),
                       field="training.batch_size", group_size=weights.objective.group_size)
  optimizer = make_optimizer(config.optimizer, config.training.num_steps,
                             muon_matrices(weights.abstract, weights.logical))
  abstract_opt = jax.eval_shape(optimizer.init, weights.abstract)
  replicated = parallel.replicated(mesh)
  opt_shardings = optimizer_shardings(abstract_opt, weights, replicated)
  emas = checkpoint.ema_keys(config.training)
  state_shardings = {"step": replicated, "params": weights.shardings, "opt_state": opt_shardings,
                     "ema": {key: weights.shardings for key in emas}, "rng": replicated}
  abstract_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": weights.abstract,
                    "opt_state": abstract_opt, "ema": {key: weights.abstract for key in emas},
                    "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  if weights.objective.teacher_decay is not None:   # the objective's EMA teacher (TVM)
    state_shardings["teacher"] = weights.shardings
    abstract_state["teacher"] = weights.abstract
  abstract_state = checkpoint.abstract_with_shardings(abstract_state, state_shardings)
  load_frozen, abstract_frozen = weights.objective.frozen, None
  if load_frozen is not None:
    abstract_frozen = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        load_frozen.shapes())
  built = Setup(config, mesh, weights, optimizer, abstract_state, state_shardings, load_frozen,
                abstract_frozen)
  _check_per_step_metrics(built)
  return built


def optimizer_shardings(abstract_opt, weights: state_lib.Weights, replicated):
  """The optimizer state's shardings: a leaf whose key path ends with a parameter's path and that
  has its shape (a moment of that parameter: AdamW's mu and nu, Muon's momentum) is sharded like
  the parameter; counters and the rest are replicated. (optax.tree_map_params cannot see
  through the labelled partition of optax's Muon, which labels the params themselves.)"""
  params = {tuple(path): (leaf.shape, sharding) for (path, leaf), sharding in zip(
      jax.tree_util.tree_leaves_with_path(weights.abstract), jax.tree.leaves(weights.shardings))}
  depth = max(map(len, params))

  def place(path, leaf):
    for length in range(1, min(len(path), depth) + 1):
      shape, sharding = params.get(tuple(path[-length:]), (None, None))
      if shape == leaf.shape:
        return sharding
    return replicated

  return jax.tree_util.tree_map_with_path(place, abstract_opt)


def _check_per_step_metrics(setup: Setup) -> None:
  """training.per_step_metrics name metrics the step returns (traced with abstract shapes)."""
  config = setup.config
  wanted = set(config.training.per_step_metrics)
  if not wanted:
    return
  batch = config.training.batch_size
  abstract_batch = {
      "image": jax.ShapeDtypeStruct((batch,) + data.element_shape(config.data), jnp.float32),
      "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  frozen = {} if setup.abstract_frozen is None else {"frozen": setup.abstract_frozen}
  _, metrics = jax.eval_shape(functools.partial(setup.objective.loss, **frozen),
                              setup.weights.abstract, abstract_batch, jax.random.key(0))
  known = sorted(set(metrics) | {"loss", "grad_norm"})
  if wanted - set(known):
    raise ValueError(f"training.per_step_metrics={tuple(config.training.per_step_metrics)}: "
                     f"objective.name={config.objective.name!r} logs only {known}")


def init_state(setup: Setup):
  """The real initial state, created directly in its shardings."""
  config = setup.config

  def init():
    params = {"net": state_lib.init_net(config), **setup.objective.extra_params}
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": setup.optimizer.init(params),
        "ema": {key: params for key in checkpoint.ema_keys(config.training)},
        "rng": jax.random.key_data(jax.random.key(config.seed + 1)).astype(jnp.uint32),
        **({"teacher": params} if setup.objective.teacher_decay is not None else {}),
    }

  with nnx.use_eager_sharding(False), jax.set_mesh(setup.mesh):
    return jax.jit(init, out_shardings=setup.state_shardings)()


def make_train_step(setup: Setup):
  """train_step(state, batch) -> (state, metrics), jitted with shardings and a donated state."""
  training = setup.config.training
  objective, optimizer = setup.objective, setup.optimizer
  cast_once = not objective.full_precision_pass
  gather_once = setup.config.mesh.gather_weights == "once"
  net_shardings = setup.weights.shardings["net"]
  batch_axes = parallel.batch_axes(setup.config.mesh.rules)

  def loss_fn(params, *args, **kwargs):
    """The objective's loss on the weights cast once to the compute dtype (state.compute_weights:
    one gradient reduction per weight however often the loss calls the network) and, with
    mesh.gather_weights = 'once', gathered over the batch axes once (parallel.gathered_once)."""
    net = params["net"]
    if cast_once:
      net = setup.model.compute_weights(net)
    if gather_once:
      net = parallel.gathered_once(net, net_shardings, batch_axes)
    return objective.loss(dict(params, net=net), *args, **kwargs)

  def train_step(state, batch, frozen=None):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    teacher = {"teacher": state["teacher"]} if "teacher" in state else {}
    if frozen is not None:
      teacher["frozen"] = frozen
    (loss, metrics), grads = grad_fn(state["params"], batch, rng, **teacher)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = {key: lerp(state["ema"][key], params, beta)
           for key, beta in ema_betas(training, state["step"] + 1).items()}
    finite = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    first_nonfinite = jnp.where(jnp.all(finite), -1, jnp.argmin(finite))
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               FIRST_NONFINITE_GRADIENT: first_nonfinite}
    new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state, ema=ema)
    if "teacher" in state:   # teacher <- lerp toward the updated weights, every step
      new_state["teacher"] = lerp(state["teacher"], params, objective.teacher_decay)
    return new_state, metrics

  batch_sharding = parallel.batch_sharding(setup.mesh, setup.config.mesh.rules)
  in_shardings = (setup.state_shardings, {"image": batch_sharding, "label": batch_sharding})
  if setup.abstract_frozen is not None:
    in_shardings += (jax.tree.map(lambda x: x.sharding, setup.abstract_frozen),)
  jitted = jax.jit(train_step, in_shardings=in_shardings,
                   out_shardings=(setup.state_shardings, parallel.replicated(setup.mesh)),
                   donate_argnums=(0,))
  return jitted if setup.abstract_frozen is None else WithFrozen(jitted, setup)


class WithFrozen:
  """train_step(state, batch) of an objective with frozen weights: a stage of the jitted step
  (the jitted function, its Lowered or its Compiled) called with them as its third argument,
  placed on the mesh at the first call. `lower(state, batch)` lowers with their abstract shapes
  (AOT compiles, where nothing is placed) and `compile()` keeps the binding, so
  `step.lower(state, batch).compile()(state, batch)` works as for a step without them; every other
  attribute (memory_analysis, cost_analysis, as_text, in_tree, ...) is the stage's."""

  def __init__(self, stage, setup: Setup, placed=None):
    self.stage, self.setup = stage, setup
    self.placed = placed if placed is not None else []   # shared by the stages derived from it

  def frozen(self):
    if not self.placed:
      shardings = jax.tree.map(lambda x: x.sharding, self.setup.abstract_frozen)
      self.placed.append(jax.device_put(self.setup.load_frozen(), shardings))
    return self.placed[0]

  def __call__(self, state, batch):
    return self.stage(state, batch, self.frozen())

  def lower(self, state, batch):
    return WithFrozen(self.stage.lower(state, batch, self.setup.abstract_frozen), self.setup,
                      self.placed)

  def compile(self, *args, **kwargs):
    return WithFrozen(self.stage.compile(*args, **kwargs), self.setup, self.placed)

  def __getattr__(self, name):
    return getattr(self.stage, name)


# EDM's EMA ramp-up: the half-life never exceeds this fraction of the images seen so far.
EMA_RAMPUP = 0.05


def ema_betas(training_config, steps_done) -> dict:
  """{EMA key: its decay beta at this step}, after `steps_done` steps (this one included).

  A constant decay is itself. A half-life of H thousand images (EDM, Karras et al. 2022, with
  its ramp-up, as pixel MeanFlow's utils/ema_util.py `edm_schedule` has it) decays by
  beta = 0.5^(B / max(min(1000·H, EMA_RAMPUP·B·steps_done), 1e-8)) for a batch of B images
  (training.batch_size; pMF writes its 1024), so early EMAs follow the weights closely.
  """
  batch = training_config.batch_size
  images = jnp.asarray(steps_done, jnp.float32) * batch
  betas = {checkpoint.halflife_key(h): 0.5 ** (batch / jnp.maximum(
               jnp.minimum(h * 1000.0, images * EMA_RAMPUP), 1e-8))
           for h in training_config.ema_halflives_kimg}
  return {**betas, **{checkpoint.ema_key(d): d for d in training_config.ema_decays}}


def lerp(ema, params, beta):
  """ema <- beta·ema + (1 - beta)·params, leaf by leaf."""
  return jax.tree.map(lambda e, p: beta * e + (1.0 - beta) * p, ema, params)


def sampling_params(state, config):
  """The EMA weights `checkpoint.sampling_ema` chooses when sampling.use_ema (and the run keeps
  an EMA), else the raw weights."""
  ema = checkpoint.sampling_ema(config)
  if config.sampling.use_ema and ema is not None:
    return state["ema"][ema]
  return state["params"]

"""The one sampling assembly: an objective's description + the network + config.sampling -> sample.

  sample = sampling.build(config, description, apply_fn)
  images = sample(params, noise, labels, key)       # noise = x at sampling.t_start

  flow.Denoiser (flow matching, k-Diff)  an ODE/SDE method of kdiff_jax.samplers (euler, heun,
                                         ddim, s_pndm, f_pndm, plms, dpm_solver_2m, unipc_2,
                                         edm_heun, euler_maruyama) with classifier-free guidance
                                         on the raw output; k-Diff's k from the params being
                                         sampled
  imm.OneStepMap (IMM)                   pushforward or restart (samplers/imm.py), guidance on G
  tvm.TerminalVelocity (TVM)             tvm (samplers/tvm.py): x <- x + (s - t)·a·F(x, t, t - s, y,
                                         beta = 1/sampling.guidance_scale), guidance trained in
  meanflow.AverageVelocity (MeanFlow)    mean_flow (samplers/mean_flow.py): z <- z - (t - r)·u,
                                         guidance trained in

One namespace: `sampling.method` and `sampling.grid` (grids.GRIDS) for every family, the method's
and grid's options in `sampling.options`. A method the objective cannot use, an option the method
does not read and a plan that cannot run (e.g. an eps model from alpha = 0) are rejected at start
by `check`, which builds the host-side plan without any network. Training's sample grids,
--mode=sample, --mode=eval and export all come through here.
"""
import jax
import jax.numpy as jnp
import numpy as np

from kdiff_jax import objectives, parallel, samplers
from kdiff_jax.samplers import grids, guidance
from kdiff_jax.schema import boolean, interval, number, one_of, sequence

# description type -> the methods that sample it
FAMILIES = {objectives.Denoiser: samplers.METHODS, objectives.OneStepMap: samplers.imm.METHODS,
            objectives.AverageVelocity: samplers.mean_flow.METHODS}
FAMILIES[objectives.TerminalVelocity] = samplers.tvm.METHODS
ALL_METHODS = tuple(method for methods in FAMILIES.values() for method in methods)

RULES = {
    "sampling.method": one_of(*ALL_METHODS),
    "sampling.num_steps": number(1, integer=True),
    "sampling.grid": one_of(*grids.GRIDS),
    "sampling.t_start": number(0, 1, low_open=True),
    "sampling.t_end": number(0, 1, high_open=True),
    "sampling.options.eta": number(0, 1),
    "sampling.options.S_churn": number(0),
    "sampling.options.S_tmin": number(0),
    "sampling.options.S_tmax": number(0, low_open=True, finite=False),
    "sampling.options.S_noise": number(0),
    "sampling.options.midpoint": one_of("t", "eta"),
    "sampling.options.variant": one_of("bh1", "bh2"),
    "sampling.options.lower_order_final": boolean(),
    "sampling.options.rho": number(0, low_open=True),
    "sampling.options.shift": number(0, low_open=True),
    "sampling.options.steps_offset": number(0, integer=True),
    "sampling.guidance_scale": number(),
    "sampling.guidance_interval": interval(number(0, 1)),
    "sampling.grid_size": number(1, integer=True),
    "sampling.use_ema": boolean(),
    "sampling.num_samples": number(1, integer=True),
    "sampling.classes": sequence(number(0, integer=True)),
    "sampling.seed": number(0, integer=True),
}


def methods(description) -> tuple:
  """The sampling methods that fit an objective's description."""
  return FAMILIES[type(description)]


def check(config) -> None:
  """The method fits the objective, its options fit the method, and the host plan builds."""
  sampling = config.sampling
  description = objectives.describe(config)
  allowed = methods(description)
  if sampling.method not in allowed:
    raise ValueError(f"sampling.method={sampling.method!r}: objective.name="
                     f"{config.objective.name!r} samples with one of {list(allowed)}")
  if isinstance(description, objectives.TerminalVelocity):
    if not sampling.guidance_scale > 0:
      raise ValueError(f"sampling.guidance_scale={sampling.guidance_scale}: TVM's network takes "
                       "beta = 1/cfg, so the guidance scale (cfg) must be > 0")
    if tuple(sampling.guidance_interval) != (0.0, 1.0):
      raise ValueError(f"sampling.guidance_interval={tuple(sampling.guidance_interval)}: TVM's "
                       "guidance is trained into every step; leave it at (0.0, 1.0)")
  if not sampling.t_end < sampling.t_start:
    raise ValueError(f"sampling.t_start={sampling.t_start}, sampling.t_end={sampling.t_end}: "
                     "sampling runs from t_start down to t_end, so t_end < t_start")
  if config.data.num_classes == 0 and sampling.classes:
    raise ValueError(f"sampling.classes={tuple(sampling.classes)}: data.num_classes=0 is "
                     "unconditional, so there are no classes to sample: leave it empty")
  bad = [c for c in sampling.classes if c >= config.data.num_classes]
  if bad:
    raise ValueError(f"sampling.classes={tuple(sampling.classes)}: each must be in "
                     f"[0, data.num_classes={config.data.num_classes})")
  options = samplers.configured_options(sampling.method, sampling.grid, sampling.options)
  _plan(config, description, options)


def _plan(config, description, options):
  """The host-side plan of config.sampling for `description` (raises where it cannot run)."""
  sampling_config = config.sampling
  if isinstance(description, objectives.TerminalVelocity):
    return time_grid(config, description)
  if isinstance(description, objectives.OneStepMap):
    times = grids.time_grid(description.schedule, sampling_config.num_steps, sampling_config.grid,
                            t_start=sampling_config.t_start, t_end=sampling_config.t_end,
                            **options)
    return samplers.imm.plan(description.schedule, times, sampling_config.method,
                             description.sigma_d)
  if isinstance(description, objectives.AverageVelocity):
    return time_grid(config, description)
  return samplers.plan(schedule=description.schedule, prediction=description.prediction,
                       method=sampling_config.method, num_steps=sampling_config.num_steps,
                       grid=sampling_config.grid, t_start=sampling_config.t_start,
                       t_end=sampling_config.t_end, noise_std=description.noise_std, **options)


def time_grid(config, description) -> np.ndarray:
  """The float64 times config.sampling steps through."""
  sampling_config = config.sampling
  options = samplers.configured_options(sampling_config.method, sampling_config.grid,
                                        sampling_config.options)
  return grids.time_grid(description.schedule, sampling_config.num_steps, sampling_config.grid,
                         t_start=sampling_config.t_start, t_end=sampling_config.t_end, **options)


def build(config, description, apply_fn):
  """sample(params, noise, labels, key) -> x at t_end, for params = {'net': ..., **extra}.

  apply_fn(net_params, x_t, t, labels, s=None) is the network (state.Model.apply).
  """
  sampling_config = config.sampling
  options = samplers.configured_options(sampling_config.method, sampling_config.grid,
                                        sampling_config.options)
  guide = dict(null_label=config.data.num_classes, guidance_scale=sampling_config.guidance_scale,
               guidance_interval=tuple(sampling_config.guidance_interval))

  if isinstance(description, objectives.AverageVelocity):
    times = time_grid(config, description)

    # iMF's network takes the guidance scale and interval as inputs (one pass per step).
    conditioning = (dict(guidance=sampling_config.guidance_scale,
                         interval=tuple(sampling_config.guidance_interval))
                    if config.model.name == "imf_dit" else {})

    def sample(params, noise, labels, key):
      del key  # deterministic
      average_velocity = lambda z, t, r, y: description.velocity(apply_fn, params["net"], z, t, r,
                                                                 y, **conditioning)
      return samplers.mean_flow.sample(average_velocity, noise, labels, times=times)
    return sample

  if isinstance(description, objectives.TerminalVelocity):
    times = time_grid(config, description)

    def sample(params, noise, labels, key):
      del key  # deterministic
      network = lambda x, t, h, y, beta: description.network(apply_fn, params["net"], x, t, h, y,
                                                             beta)
      return samplers.tvm.sample(network, noise, labels, times=times,
                                 cfg=sampling_config.guidance_scale,
                                 scale_output=description.scale_output)
    return sample

  if isinstance(description, objectives.OneStepMap):
    def sample(params, noise, labels, key):
      raw_fn = lambda x_t, s_, t, y: description.network(apply_fn, params["net"], x_t, s_, t, y)
      return samplers.imm.sample(
          raw_fn, description.map, noise, labels, schedule=description.schedule,
          method=sampling_config.method, num_steps=sampling_config.num_steps,
          grid=sampling_config.grid, t_start=sampling_config.t_start,
          t_end=sampling_config.t_end, noise_std=description.sigma_d, key=key, **guide, **options)
    return sample

  def sample(params, noise, labels, key):
    network = lambda x_t, t, y: apply_fn(params["net"], x_t, t, y).astype(jnp.float32)
    model_fn = guidance.classifier_free(network, labels, null_label=guide["null_label"],
                                        scale=guide["guidance_scale"],
                                        interval=guide["guidance_interval"])
    k = None if description.k is None else (lambda t: description.k(params, t))
    return samplers.sample(
        model_fn, noise, schedule=description.schedule, prediction=description.prediction,
        method=sampling_config.method, num_steps=sampling_config.num_steps, key=key,
        grid=sampling_config.grid, t_start=sampling_config.t_start, t_end=sampling_config.t_end,
        k=k, noise_std=description.noise_std, min_divisor=description.min_divisor, **options)

  return sample


def cycling_labels(num_samples: int, classes) -> np.ndarray:
  """Labels for num_samples samples cycling through `classes`."""
  classes = np.asarray(classes, np.int32)
  return classes[np.arange(num_samples) % len(classes)]


def all_classes(config) -> tuple:
  """Every class, or (0,) for an unconditional model (data.num_classes = 0; the label is unused)."""
  return tuple(range(config.data.num_classes)) or (0,)


def classes(config) -> tuple:
  """sampling.classes, or every class (all_classes) when it is empty."""
  return tuple(config.sampling.classes) or all_classes(config)


def make_sampler(config, sample, mesh, labels):
  """jit(params, key) -> [len(labels), H, W, C] samples of `labels`, replicated on every host.

  The noise is noise_std·N(0, I) from the first half of `key`, the sampler's own randomness
  from the second.
  """
  labels = jnp.asarray(labels, jnp.int32)
  shape = (labels.shape[0], config.data.image_size, config.data.image_size, config.data.channels)

  def draw(params, key):
    key_noise, key_sampler = jax.random.split(key)
    noise = config.objective.noise_std * jax.random.normal(key_noise, shape, jnp.float32)
    return sample(params, noise, labels, key_sampler)

  return jax.jit(draw, out_shardings=parallel.replicated(mesh))

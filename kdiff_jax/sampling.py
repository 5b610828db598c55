"""The one sampling assembly: an objective's description + the network + config.sampling -> sample.

  sample = sampling.build(config, description, apply_fn)
  images = sample(params, noise, labels, key)       # noise = x at sampling.t_start

The description (objectives.Description) answers for its objective: the methods that fit it
(`description.methods`), its host plan, and the sample function (`description.sampler`). The
package's:

  flow.Denoiser (flow matching, k-Diff)  an ODE/SDE method of kdiff_jax.samplers (euler, heun,
                                         ddim, s_pndm, f_pndm, plms, dpm_solver_2m, unipc_2,
                                         edm_heun, euler_maruyama) with classifier-free guidance
                                         on the raw output; k-Diff's k from the params being
                                         sampled
  imm.OneStepMap (IMM)                   pushforward or restart (samplers/imm.py), guidance on G
  tvm.TerminalVelocity (TVM)             tvm (samplers/tvm.py): x <- x + (s - t)·a·F(x, t, t - s, y,
                                         beta = 1/sampling.guidance_scale), guidance trained in
  meanflow.AverageVelocity (MeanFlow)    mean_flow (samplers/mean_flow.py): z <- z - (t - r)·u,
                                         guidance trained in; iMF's feeds ω and the interval

One namespace: `sampling.method` and `sampling.grid` (grids.GRIDS) for every family, the method's
and grid's options in `sampling.options`. A method the objective cannot use, an option the method
does not read and a plan that cannot run (e.g. an eps model from alpha = 0) are rejected at start
by `check`, which builds the host-side plan without any network. Training's sample grids,
--mode=sample, --mode=eval and export all come through here.
"""
import jax
import jax.numpy as jnp
import numpy as np

from kdiff_jax import objectives, parallel
from kdiff_jax.samplers import grids
from kdiff_jax.schema import boolean, interval, number, one_of, sequence, text

RULES = {
    "sampling.method": text(),   # one of the objective's description.methods (`check`)
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
    "sampling.ema_halflife_kimg": number(0, note="0 = the first kept"),
    "sampling.num_samples": number(1, integer=True),
    "sampling.classes": sequence(number(0, integer=True)),
    "sampling.seed": number(0, integer=True),
}


def check(config) -> None:
  """The method fits the objective, guidance has a condition to act on, the description accepts
  the settings, the method reads its options, and the host plan builds."""
  sampling = config.sampling
  description = objectives.describe(config)
  if sampling.method not in description.methods:
    raise ValueError(f"sampling.method={sampling.method!r}: objective.name="
                     f"{config.objective.name!r} samples with one of {list(description.methods)}")
  if config.data.num_classes == 0 and sampling.guidance_scale != 1:
    raise ValueError(f"sampling.guidance_scale={sampling.guidance_scale}: the network "
                     "ignores labels (data.num_classes=0: unconditional, no label embedding), so "
                     "guidance has no condition to act on: set sampling.guidance_scale=1.0")
  if not config.model.class_conditional and sampling.guidance_scale != 1:
    raise ValueError(f"sampling.guidance_scale={sampling.guidance_scale}: the network "
                     "ignores labels (model.class_conditional=False), so guidance would change "
                     "nothing: set sampling.guidance_scale=1.0")
  description.check_sampling(config)
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
  description.plan(config)   # the package's also refuse an option the method and grid do not read


def time_grid(config, description) -> np.ndarray:
  """The float64 times config.sampling steps through (`description.time_grid`)."""
  return np.asarray(description.time_grid(config), np.float64)


def build(config, description, apply_fn):
  """sample(params, noise, labels, key) -> x at t_end, for params = {'net': ..., **extra}.

  apply_fn(net_params, x_t, t, labels, s=None) is the network (state.Model.apply); the
  description assembles it (`description.sampler`).
  """
  return description.sampler(config, apply_fn)


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

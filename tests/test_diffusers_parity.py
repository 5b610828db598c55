"""Parity with diffusers' schedulers from the config alone (issue 18; samplers/grids.py).

One deterministic model, written once for jax.numpy and torch, drives diffusers' scheduler loop
(`for k in scheduler.timesteps: x = scheduler.step(model(x, k), k, x).prev_sample`) and
kdiff_jax.samplers.sample with the matching method, grid and options:

  DDIMScheduler(eta=0, clip_sample=False)          ddim           leading / trailing
  PNDMScheduler(skip_prk_steps=True)               plms           leading / trailing
  DPMSolverMultistepScheduler(dpmsolver++, 2)      dpm_solver_2m  linspace / leading_multistep / trailing
  UniPCMultistepScheduler(bh2, order 2)            unipc_2        linspace / leading_multistep / trailing

Each run compares the sequence of model calls (diffusers' timestep k, the x the model sees) and
the final x. Our model_fn gets t and reads k = round(T·t) - 1; every t it is called with is
exactly (k + 1)/T, so that conversion is exact. diffusers builds its alphas_cumprod in float32
(torch.linspace betas, cumprod), our VP in float64: the parity runs hand diffusers the same float64
table, and `test_stock_float32_tables` measures what the float32 table alone changes.
diffusers' DDIM / PNDM keep the sample in float64 then, so they agree to rounding; DPM-Solver++
and UniPC keep their sigmas in float32 (and DPM-Solver++ casts the sample to float32 per step),
which bounds their agreement near 1e-6.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from kdiff_jax import config as config_lib, objectives, samplers, sampling, schedules
from kdiff_jax.samplers import grids

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
# diffusers' np.array(torch tensor) under NumPy 2, inside its set_timesteps.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

VP, RF = schedules.VP(), schedules.RectifiedFlow()
T = VP.num_steps
ALPHABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))   # DDPM's table in float64, alphabar_k
X = np.random.default_rng(0).standard_normal((3, 5))      # x at the first timestep
NUM_STEPS = (10, 25, 50)
TOL = {"ddim": 1e-10, "plms": 1e-10, "dpm_solver_2m": 1e-5, "unipc_2": 1e-5}  # relative to max(1, |x|)


def model_output(xp, x, alphabar, k, prediction):
  """A fixed nonlinear denoiser D = alpha·s²/(alpha²s² + sigma²)·x + 0.2·alpha·sin(2x + k/100)
  (s = 0.5), returned as eps = (x - alpha·D)/sigma or v = alpha·eps - sigma·D."""
  alpha, sigma = xp.sqrt(alphabar), xp.sqrt(1.0 - alphabar)
  denoised = alpha * 0.25 / (alpha**2 * 0.25 + sigma**2) * x + 0.2 * alpha * xp.sin(2.0 * x + k / 100.0)
  eps = (x - alpha * denoised) / sigma
  return eps if prediction == "eps" else alpha * eps - sigma * denoised


def run_ours(method, grid, num_steps, prediction, t_end, **options):
  """(final x, [(k, x) of each model call]) of kdiff_jax.samplers.sample, eager."""
  calls = []

  def model_fn(x, t):
    k = jnp.round(T * t).astype(jnp.int32) - 1       # diffusers' timestep of t = (k + 1)/T
    assert np.all(np.asarray(t) == (np.asarray(k) + 1.0) / T), t   # the conversion is exact
    calls.append((int(k[0]), np.asarray(x)))
    return model_output(jnp, x, jnp.asarray(ALPHABAR)[k][:, None], k[:, None].astype(x.dtype),
                        prediction)

  with jax.enable_x64(True):
    out = samplers.sample(model_fn, X, schedule=VP, prediction=prediction, method=method,
                          num_steps=num_steps, grid=grid, t_end=t_end, scan=False, **options)
    return np.asarray(out), calls


def float64_tables(scheduler):
  """The scheduler with our float64 alphabar table in place of its float32 one."""
  scheduler.alphas_cumprod = torch.from_numpy(ALPHABAR.copy())
  if hasattr(scheduler, "final_alpha_cumprod"):   # DDIM, PNDM: alphabar after the last step
    one = scheduler.config.set_alpha_to_one
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if one else scheduler.alphas_cumprod[0]
  return scheduler


def run_diffusers(scheduler, num_steps, prediction):
  """(final x, [(k, x) of each model call]) of diffusers' sampling loop in float64."""
  scheduler.set_timesteps(num_steps)
  alphabar = torch.from_numpy(ALPHABAR)
  x, calls = torch.from_numpy(X.copy()), []
  for k in scheduler.timesteps.tolist():
    calls.append((k, x.numpy().copy()))
    out = model_output(torch, x, alphabar[k], torch.tensor(float(k), dtype=torch.float64), prediction)
    x = scheduler.step(out, k, x).prev_sample
  return x.numpy(), calls


def compare(ours, theirs):
  """(max error of the final x, max error of the model inputs), relative to max(1, |x|)."""
  (x_ours, calls_ours), (x_theirs, calls_theirs) = ours, theirs
  assert [k for k, _ in calls_ours] == [k for k, _ in calls_theirs]
  scale = max(1.0, float(np.max(np.abs(x_theirs))))
  inputs = max(float(np.max(np.abs(a - b))) for (_, a), (_, b) in zip(calls_ours, calls_theirs))
  return float(np.max(np.abs(x_ours - x_theirs))) / scale, inputs / scale


def _ddim(**kwargs):
  return diffusers.DDIMScheduler(clip_sample=False, **kwargs)


def _pndm(**kwargs):
  return diffusers.PNDMScheduler(skip_prk_steps=True, **kwargs)


def _dpm(**kwargs):
  return diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **kwargs)


def _unipc(**kwargs):
  return diffusers.UniPCMultistepScheduler(solver_order=2, solver_type="bh2", **kwargs)


# id -> (diffusers scheduler, its config, our method, grid, options(num_steps), t_end, predictions)
# set_alpha_to_one=True / final_sigmas_type='zero' end at alphabar = 1 (t_end = 0); False /
# 'sigma_min' at alphabar_0 (t_end = 1/T). "sd": Stable Diffusion's leading + steps_offset=1.
# PLMS is compared for eps only: with v_prediction diffusers combines the raw v outputs of past
# steps and converts the sum at the current (x, t), where plms combines the eps of each step.
CASES = {
    "ddim-leading": (_ddim, dict(timestep_spacing="leading", set_alpha_to_one=True),
                     "ddim", "leading", lambda n: {}, 0.0, ("eps",)),
    "ddim-leading-sd": (_ddim, dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False),
                        "ddim", "leading", lambda n: {"steps_offset": 1}, 1 / T, ("eps", "v")),
    "ddim-trailing": (_ddim, dict(timestep_spacing="trailing", set_alpha_to_one=False),
                      "ddim", "trailing", lambda n: {}, 1 / T, ("eps",)),
    "plms-leading": (_pndm, dict(timestep_spacing="leading", set_alpha_to_one=True),
                     "plms", "leading", lambda n: {}, 0.0, ("eps",)),
    "plms-leading-sd": (_pndm, dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False),
                        "plms", "leading", lambda n: {"steps_offset": 1}, 1 / T, ("eps",)),
    "plms-trailing": (_pndm, dict(timestep_spacing="trailing", set_alpha_to_one=False),
                      "plms", "trailing", lambda n: {}, 1 / T, ("eps",)),
    "dpm-linspace": (_dpm, dict(timestep_spacing="linspace"),
                     "dpm_solver_2m", "linspace", lambda n: {}, 0.0, ("eps", "v")),
    "dpm-leading-sd": (_dpm, dict(timestep_spacing="leading", steps_offset=1),
                       "dpm_solver_2m", "leading_multistep", lambda n: {"steps_offset": 1}, 0.0, ("eps",)),
    # sigma_min: the last step is first order where lower_order_final applies (N < 15).
    "dpm-trailing-sigma_min": (_dpm, dict(timestep_spacing="trailing", final_sigmas_type="sigma_min"),
                               "dpm_solver_2m", "trailing", lambda n: {"lower_order_final": n < 15},
                               1 / T, ("eps",)),
    "unipc-linspace": (_unipc, dict(timestep_spacing="linspace"),
                       "unipc_2", "linspace", lambda n: {}, 0.0, ("eps", "v")),
    "unipc-leading-sd": (_unipc, dict(timestep_spacing="leading", steps_offset=1),
                         "unipc_2", "leading_multistep", lambda n: {"steps_offset": 1}, 0.0, ("eps",)),
    # UniPC's lower_order_final (default True) makes every last step first order.
    "unipc-trailing-sigma_min": (_unipc, dict(timestep_spacing="trailing", final_sigmas_type="sigma_min"),
                                 "unipc_2", "trailing", lambda n: {"lower_order_final": True},
                                 1 / T, ("eps",)),
}
PARAMS = [(case, prediction) for case, spec in CASES.items() for prediction in spec[-1]]


def parity_errors(case, prediction, num_steps, tables=float64_tables):
  """(final-x error, model-input error) of one case against diffusers."""
  make, config, method, grid, options, t_end, _ = CASES[case]
  diffusers_prediction = {"eps": "epsilon", "v": "v_prediction"}[prediction]
  scheduler = tables(make(prediction_type=diffusers_prediction, **config))
  theirs = run_diffusers(scheduler, num_steps, prediction)
  ours = run_ours(method, grid, num_steps, prediction, t_end, **options(num_steps))
  return compare(ours, theirs)


@pytest.mark.parametrize("case, prediction", PARAMS, ids=[f"{c}-{p}" for c, p in PARAMS])
def test_trajectories_match_diffusers(case, prediction):
  method = CASES[case][2]
  for num_steps in NUM_STEPS:
    final, inputs = parity_errors(case, prediction, num_steps)
    assert final <= TOL[method] and inputs <= TOL[method], (num_steps, final, inputs)


def test_stock_float32_tables():
  """Unmodified diffusers (float32 alphas_cumprod): within 5e-5; the rest of the gap is that table."""
  for case in ("ddim-leading-sd", "plms-leading-sd", "dpm-linspace", "unipc-linspace"):
    final, inputs = parity_errors(case, "eps", 25, tables=lambda scheduler: scheduler)
    assert max(final, inputs) <= 5e-5, (case, final, inputs)


def test_grids_are_diffusers_timesteps():
  np.testing.assert_allclose(VP.alpha((np.arange(T) + 1.0) / T) ** 2, ALPHABAR, rtol=1e-12)
  for num_steps in NUM_STEPS:
    for case in ("ddim-leading-sd", "ddim-trailing", "dpm-linspace", "dpm-leading-sd", "dpm-trailing-sigma_min"):
      make, config, _, grid, options, t_end, _ = CASES[case]
      scheduler = make(**config)
      scheduler.set_timesteps(num_steps)
      grid_options = {k: v for k, v in options(num_steps).items() if k in grids.GRID_OPTIONS}
      times = samplers.time_grid(VP, num_steps, grid, t_end=t_end, **grid_options)
      np.testing.assert_array_equal(np.round(T * times[:-1]) - 1, scheduler.timesteps.numpy())
      assert times[-1] == t_end
  # PNDM's PLMS evaluates its first target twice (N + 1 model calls).
  scheduler = _pndm(timestep_spacing="leading", steps_offset=1)
  scheduler.set_timesteps(10)
  assert len(scheduler.timesteps) == samplers.nfe("plms", 10) == 11


def test_plms_ramp_and_one_step():
  """Few steps: the improved Euler step, AB2, AB3, AB4 boundaries, and diffusers' 1-step PLMS (1 NFE)."""
  for num_steps in (1, 2, 3, 4, 5):
    final, inputs = parity_errors("plms-leading-sd", "eps", num_steps)
    assert final <= 1e-10 and inputs <= 1e-10, (num_steps, final, inputs)
    assert samplers.nfe("plms", num_steps) == (1 if num_steps == 1 else num_steps + 1)


def test_plms_scan_jit_and_phases():
  model_fn = lambda x, t: model_output(jnp, x, VP.alpha(t[:, None]) ** 2, 0.0, "eps")
  kwargs = dict(schedule=VP, prediction="eps", method="plms", num_steps=7, grid="leading",
                steps_offset=1, t_end=1 / T)
  with jax.enable_x64(True):
    looped = samplers.sample(model_fn, X, scan=False, **kwargs)
    jitted = jax.jit(lambda x: samplers.sample(model_fn, x, **kwargs))(X)
  np.testing.assert_allclose(jitted, looped, rtol=1e-12, atol=1e-12)
  plan = samplers.plan(**kwargs)
  assert [p.length for p in plan.phases] == [1, 1, 1, 4]   # improved Euler, AB2, AB3, AB4


def test_what_diffusers_does_that_a_grid_cannot():
  """DDIM / PNDM with linspace step a fixed floor(T/N) below each timestep, so their step's target
  is not the next step's source: no grid reproduces it (use leading, or trailing with N | T)."""
  scheduler = _ddim(timestep_spacing="linspace")
  scheduler.set_timesteps(10)
  k = scheduler.timesteps.numpy()
  assert not np.array_equal(k[:-1] - T // 10, k[1:])


def test_clear_errors():
  with pytest.raises(ValueError, match=r"sampling.grid='leading'.*VP schedule.*'rectified_flow'"):
    samplers.time_grid(RF, 10, "leading")
  with pytest.raises(ValueError, match=r"sampling.options.steps_offset=-1: must be an int >= 0"):
    samplers.time_grid(VP, 10, "leading", steps_offset=-1)
  with pytest.raises(ValueError, match=r"sampling.t_start=0.9: .*leave sampling.t_start = 1"):
    samplers.time_grid(VP, 10, "linspace", t_start=0.9)
  # DDIM leading without offset and set_alpha_to_one=False ends with the empty step alphabar_0 -> alphabar_0.
  with pytest.raises(ValueError, match=r"sampling.t_end=0.001: .*ends its steps at k = 0"):
    samplers.time_grid(VP, 10, "leading", t_end=1 / T)
  with pytest.raises(ValueError, match=r"not 10 distinct steps in \[0, 999\]"):
    samplers.time_grid(VP, 10, "leading", steps_offset=100)
  with pytest.raises(ValueError, match=r"sampling.options.steps_offset=1 has no effect.*'linspace'.*grid leading"):
    samplers.configured_options("ddim", "linspace", {"steps_offset": 1})
  with pytest.raises(ValueError, match=r"lower_order_final=True has no effect.*'ddim'.*dpm_solver_2m"):
    samplers.configured_options("ddim", "leading", {"lower_order_final": True})


def test_config_reaches_the_diffusers_grids():
  config = default.get_config()
  config.objective.schedule, config.objective.prediction, config.objective.loss_target = "vp", "eps", "eps"
  config.sampling.method, config.sampling.grid, config.sampling.num_steps = "plms", "leading", 50
  config.sampling.options.steps_offset, config.sampling.t_end = 1, 1 / T   # Stable Diffusion's PNDM
  config_lib.validate(config)
  times = sampling.time_grid(config, objectives.describe(config))
  assert np.round(T * times[0]) - 1 == 981 and times[-1] == 1 / T
  config.sampling.options.steps_offset = -1
  with pytest.raises(ValueError, match=r"sampling.options.steps_offset=-1: must be an int >= 0"):
    config_lib.validate(config)
  config.sampling.options.steps_offset = 1
  config.objective.schedule, config.sampling.t_start = "cosine", 0.999
  with pytest.raises(ValueError, match=r"sampling.grid='leading'.*VP schedule"):
    config_lib.validate(config)

"""Samplers against exact Gaussian flows, model-free (docs/samplers.md, "What the tests check").

The exact denoiser and flow map of N(mu, diag s^2) data are tests/references.py's
(gaussian_model, exact_flow), handed to the sampler in any parameterization via
parameterization.from_x_eps. Convergence is measured in float64.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdiff_jax import parameterization
from kdiff_jax import samplers
from kdiff_jax import schedules
from kdiff_jax.samplers import guidance
from tests import references

VP, RF, COSINE = schedules.VP(), schedules.RectifiedFlow(), schedules.Cosine()
MU = np.array([0.5, -1.0, 0.0, 2.0])
S = np.array([0.3, 1.0, 0.5, 0.7])
DETERMINISTIC = ("euler", "heun", "ddim", "s_pndm", "f_pndm", "dpm_solver_2m", "unipc_2", "edm_heun")
STOCHASTIC = (("ddim", {"eta": 0.7}), ("euler_maruyama", {}), ("edm_heun", {"S_churn": 10.0}))
X_BAR_METHODS = ("s_pndm", "f_pndm", "plms", "edm_heun", "euler_maruyama")  # undefined where alpha = 0


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def gaussian_model(schedule, prediction, mu=MU, s=S, **options):
  """references.gaussian_model of N(MU, diag S^2) unless told otherwise (options: noise_std, k, calls)."""
  return references.gaussian_model(schedule, prediction, mu, s, **options)


def exact_flow(schedule, x_t, t, s, mu=MU, std=S, noise_std=1.0):
  return references.exact_flow(schedule, x_t, t, s, mu, std, noise_std)


def x_start(batch=8, dim=4, seed=0, dtype=np.float64):
  return np.asarray(jax.random.normal(jax.random.key(seed), (batch, dim)), dtype) * 1.3


# --- convergence order -------------------------------------------------------------------------

ORDERS = {"ddim": 1.0, "s_pndm": 2.0, "f_pndm": 2.0, "dpm_solver_2m": 2.0, "edm_heun": 2.0, "unipc_2": 3.0}


@pytest.mark.parametrize("schedule, grid, prediction, t_start", [
    (VP, "karras", "x", 1.0),                   # eta(1) ~ 157 for the DDPM table
    (RF, "uniform_lambda", "eps", 0.99),        # an eps model on rectified flow starts below t = 1
], ids=["vp-karras-x", "rf-uniform_lambda-eps"])
def test_global_convergence_order(x64, schedule, grid, prediction, t_start):
  t_end = float(schedule.eta_inv(np.float64(0.002)))  # every step an ordinary one
  x = x_start()
  exact = exact_flow(schedule, x, t_start, t_end)
  model_fn = gaussian_model(schedule, prediction)
  for method, order in ORDERS.items():
    errors = []
    for num_steps in (40, 80):
      out = samplers.sample(model_fn, x, schedule=schedule, prediction=prediction, method=method,
                            num_steps=num_steps, grid=grid, t_start=t_start, t_end=t_end)
      errors.append(np.sqrt(np.mean((np.asarray(out) - exact) ** 2)))
    measured = np.log2(errors[0] / errors[1])
    assert abs(measured - order) <= 0.15, (method, errors, measured)


def test_f_pndm_is_fourth_order_on_a_grid_uniform_in_eta(x64):
  times = RF.eta_inv(np.linspace(3.0, 0.3, 41))
  x = x_start(dim=2)
  mu, s = MU[:2], np.array([0.5, 1.0])
  errors = []
  for times_n in (times[::2], times):
    out = samplers.sample(gaussian_model(RF, "x", mu, s), x, schedule=RF, prediction="x",
                          method="f_pndm", num_steps=len(times_n) - 1, grid=times_n)
    errors.append(np.sqrt(np.mean((np.asarray(out) - exact_flow(RF, x, times[0], times[-1], mu, s)) ** 2)))
  assert np.log2(errors[0] / errors[1]) > 3.7, errors


# --- exactness, law of the output, no NaN -----------------------------------------------------

@pytest.mark.parametrize("schedule", [VP, RF], ids=lambda s: s.name)
def test_point_mass_is_exact_at_three_steps(x64, schedule):
  mu, zero = MU, np.zeros_like(MU)
  x = x_start()
  methods = ["ddim", "s_pndm", "f_pndm", "dpm_solver_2m", "unipc_2", "edm_heun"]
  methods += ["euler", "heun"] if schedule is RF else []  # straight paths in t only for RF
  for method in methods:
    t_start = 0.99 if (schedule is RF and method in X_BAR_METHODS) else 1.0
    for prediction in ("eps", "x") if t_start < 1 else ("x",):
      out = samplers.sample(gaussian_model(schedule, prediction, mu, zero), x, schedule=schedule,
                            prediction=prediction, method=method, num_steps=3, t_start=t_start)
      np.testing.assert_allclose(out, np.broadcast_to(mu, x.shape), atol=1e-10, rtol=0,
                                 err_msg=f"{method} {prediction}")


@pytest.mark.parametrize("method, order", [("ddim", 1), ("dpm_solver_2m", 2), ("edm_heun", 2), ("f_pndm", 2)])
def test_exact_output_law_w2_falls_with_steps(x64, method, order):
  """The sampler is affine in x_T, so x_T ~ N(alpha_T mu, c_T) gives an exactly Gaussian output."""
  mu, s = MU[:2], np.array([0.5, 1.0])
  t_start = float(RF.eta_inv(np.float64(80.0)))
  model_fn = gaussian_model(RF, "eps", mu, s)
  w2 = []
  for num_steps in (8, 16, 32):
    out = np.asarray(samplers.sample(model_fn, np.array([[0.0, 0.0], [1.0, 1.0]]), schedule=RF,
                                     prediction="eps", method=method, num_steps=num_steps,
                                     grid="karras", t_start=t_start))
    slope, offset = out[1] - out[0], out[0]
    alpha_T = RF.alpha(t_start)
    mean = slope * alpha_T * mu + offset
    std = np.abs(slope) * np.sqrt(alpha_T**2 * s**2 + RF.sigma(t_start) ** 2)
    w2.append(np.sqrt(np.sum((mean - mu) ** 2 + (std - s) ** 2)))
  assert w2[0] > w2[1] > w2[2], w2
  assert np.log2(w2[1] / w2[2]) > order - 0.3, w2


@pytest.mark.parametrize("method", samplers.METHODS)
def test_no_nan_with_final_sigma_zero(method):
  key = jax.random.key(3)
  options = {"S_churn": 5.0} if method == "edm_heun" else {}
  # VP in float32 from t = 1 to 0; point-mass data on rectified flow, where n_hat divides by sigma.
  for schedule, grid, prediction, s in ((VP, "karras", "eps", S), (RF, "uniform_lambda", "x", 0 * S)):
    t_start = 0.999 if (schedule is RF and method in X_BAR_METHODS) else 1.0
    for mu in (MU,):
      out = samplers.sample(gaussian_model(schedule, prediction, jnp.float32(mu), jnp.float32(s)),
                            x_start(dtype=np.float32), schedule=schedule, prediction=prediction,
                            method=method, num_steps=6, grid=grid, t_start=t_start, key=key, **options)
      assert out.dtype == jnp.float32
      assert np.all(np.isfinite(out)), (method, schedule.name, grid)


def test_ddim_is_euler_on_rectified_flow(x64):
  x = x_start()
  run = lambda method: samplers.sample(gaussian_model(RF, "velocity"), x, schedule=RF, prediction="velocity",
                                       method=method, num_steps=7, grid="shift", shift=3.0)
  np.testing.assert_allclose(run("ddim"), run("euler"), rtol=1e-12, atol=1e-12)


# --- every parameterization ---------------------------------------------------------------------

@pytest.mark.parametrize("method", ["dpm_solver_2m", "edm_heun", "heun"])
def test_every_prediction_gives_the_same_samples(x64, method):
  """The parameterization only enters through parameterization.to_x_eps, so samples agree."""
  x = x_start()
  common = dict(method=method, num_steps=5, grid="karras", noise_std=0.8)
  reference = samplers.sample(gaussian_model(COSINE, "x", noise_std=0.8), x, schedule=COSINE,
                              prediction="x", t_start=0.98, **common)
  for prediction in parameterization.PREDICTIONS:
    k = 0.3 if prediction == "u_k" else None
    out = samplers.sample(gaussian_model(COSINE, prediction, noise_std=0.8, k=k), x, schedule=COSINE,
                          prediction=prediction, k=k, t_start=0.98, **common)
    np.testing.assert_allclose(out, reference, rtol=1e-9, atol=1e-9, err_msg=prediction)
  if method not in X_BAR_METHODS:  # rectified flow from t = 1 for the models that have x_hat there
    reference = samplers.sample(gaussian_model(RF, "x", noise_std=0.8), x, schedule=RF, prediction="x",
                                t_start=1.0, **common)
    for prediction, k in (("v", None), ("velocity", None), ("u_k", 0.7)):
      out = samplers.sample(gaussian_model(RF, prediction, noise_std=0.8, k=k), x, schedule=RF,
                            prediction=prediction, k=k, t_start=1.0, **common)
      np.testing.assert_allclose(out, reference, rtol=1e-9, atol=1e-9, err_msg=prediction)


# --- NFE, loop equivalences, keys -----------------------------------------------------------------

@pytest.mark.parametrize("method", samplers.METHODS)
def test_nfe_counts(method):
  key = jax.random.key(0)
  for t_end in (0.0, 0.05):
    for num_steps in (1, 2, 3, 5):
      calls = []
      samplers.sample(gaussian_model(RF, "x", calls=calls), x_start(2, dtype=np.float32), schedule=RF,
                      prediction="x", method=method, num_steps=num_steps, t_start=0.99, t_end=t_end,
                      key=key, scan=False)
      assert len(calls) == samplers.nfe(method, num_steps, final_sigma_zero=t_end == 0.0), (num_steps, t_end)
      assert min(t for _, t in calls) > 0.0  # never a model call at sigma = 0
  assert samplers.nfe("f_pndm", 10) == 19 and samplers.nfe("s_pndm", 10) == 11
  assert samplers.nfe("edm_heun", 10) == 19 and samplers.nfe("heun", 10) == 19


def test_nfe_inside_scan_and_jit():
  calls = []
  model_fn = gaussian_model(RF, "x")

  def counted(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return model_fn(x, t)

  run = jax.jit(lambda x: samplers.sample(counted, x, schedule=RF, prediction="x", method="f_pndm",
                                          num_steps=7, t_start=0.99))
  jax.block_until_ready(run(x_start(dtype=np.float32)))
  assert len(calls) == samplers.nfe("f_pndm", 7) == 16


@pytest.mark.parametrize("method, options", [(m, {}) for m in DETERMINISTIC] + list(STOCHASTIC),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_scan_equals_python_loop_and_jit_equals_eager(x64, method, options):
  key = jax.random.key(1)
  x = x_start(4)
  kwargs = dict(schedule=COSINE, prediction="eps", method=method, num_steps=5, grid="uniform_lambda",
                t_start=0.98, key=key, **options)
  model_fn = gaussian_model(COSINE, "eps")
  scanned = samplers.sample(model_fn, x, **kwargs)
  looped = samplers.sample(model_fn, x, scan=False, **kwargs)
  np.testing.assert_allclose(scanned, looped, rtol=1e-12, atol=1e-12)
  jitted = jax.jit(lambda noise, key: samplers.sample(model_fn, noise, **{**kwargs, "key": key}))(x, key)
  np.testing.assert_allclose(jitted, scanned, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method, options", STOCHASTIC, ids=lambda v: v if isinstance(v, str) else "")
def test_same_key_same_samples(method, options):
  model_fn = gaussian_model(COSINE, "v")
  run = jax.jit(lambda noise, key: samplers.sample(model_fn, noise, schedule=COSINE, prediction="v",
                                                   t_start=0.98,
                                                   method=method, num_steps=6, key=key, **options))
  x = x_start(dtype=np.float32)
  first, again = run(x, jax.random.key(7)), run(x, jax.random.key(7))
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, run(x, jax.random.key(8)))


def test_stochastic_samplers_reach_the_data_law():
  """DDIM(eta = 1) and Euler–Maruyama: mean and std of many samples near those of the data."""
  mu, s = np.float32([1.0]), np.float32([0.5])
  t_start = float(VP.eta_inv(np.float64(80.0)))
  noise = np.asarray(jax.random.normal(jax.random.key(0), (20000, 1))) * np.sqrt(
      VP.alpha(t_start) ** 2 * 0.25 + VP.sigma(t_start) ** 2) + VP.alpha(t_start) * 1.0
  for method, options in (("ddim", {"eta": 1.0}), ("euler_maruyama", {})):
    out = np.asarray(samplers.sample(gaussian_model(VP, "eps", mu, s), noise.astype(np.float32),
                                     schedule=VP, prediction="eps", method=method, num_steps=400,
                                     grid="karras", t_start=t_start, key=jax.random.key(1), **options))
    assert abs(out.mean() - 1.0) < 0.02 and abs(out.std() - 0.5) < 0.02, (method, out.mean(), out.std())


# --- grids ---------------------------------------------------------------------------------------

def test_grids():
  # Karras in eta = sigma/alpha, EDM's sigma_N = 0 appended, and rectified flow's t = 1 kept apart.
  times = samplers.time_grid(VP, 5, "karras")
  eta_max, eta_min = VP.eta(1.0), 0.002
  ramp = (eta_max ** (1 / 7) + np.arange(5) / 4 * (eta_min ** (1 / 7) - eta_max ** (1 / 7))) ** 7
  np.testing.assert_allclose(VP.eta(times[:-1]), ramp, rtol=1e-9)
  assert times[0] == 1.0 and times[-1] == 0.0
  times = samplers.time_grid(RF, 6, "karras")
  assert times[0] == 1.0 and times[-1] == 0.0
  np.testing.assert_allclose(RF.eta(times[1:-1])[[0, -1]], [80.0, 0.002], rtol=1e-12)
  # Uniform in lambda; SD3 shift; explicit end points hit exactly.
  times = samplers.time_grid(RF, 8, "uniform_lambda", t_start=0.9, t_end=0.1)
  np.testing.assert_allclose(np.diff(RF.lambda_(times)), np.diff(RF.lambda_(times))[0], rtol=1e-9)
  assert (times[0], times[-1]) == (0.9, 0.1)
  times = samplers.time_grid(RF, 4, "shift", shift=3.0)
  np.testing.assert_allclose(times, 3 * np.linspace(1, 0, 5) / (1 + 2 * np.linspace(1, 0, 5)))
  # The target of each step is the source of the next.
  the_plan = samplers.plan(schedule=VP, prediction="x", method="edm_heun", num_steps=6, grid="karras")
  sources = np.concatenate([p.coefs["t"] for p in the_plan.phases])
  targets = np.concatenate([p.coefs["s"] for p in the_plan.phases])
  times = samplers.time_grid(VP, 6, "karras")
  np.testing.assert_array_equal(sources, times[:-1])
  np.testing.assert_array_equal(targets, times[1:])


# --- guidance ------------------------------------------------------------------------------------

def test_classifier_free_guidance():
  calls = []

  def apply_fn(x, t, y):
    calls.append(x.shape[0])
    return x * (1.0 + y[:, None]) + t[:, None]

  x = jnp.ones((3, 2))
  labels = jnp.array([1, 2, 3])
  t = jnp.array([0.1, 0.5, 0.9])
  plain = guidance.classifier_free(apply_fn, labels, null_label=0, scale=1.0)
  np.testing.assert_allclose(plain(x, t), apply_fn(x, t, labels))
  assert calls == [3, 3]
  calls.clear()
  guided = guidance.classifier_free(apply_fn, labels, null_label=0, scale=4.0, interval=(0.3, 0.6))
  out = guided(x, t)
  assert calls == [6]  # one batched call, conditional and null together
  cond, null = apply_fn(x, t, labels), apply_fn(x, t, jnp.zeros_like(labels))
  want = jnp.where(((t >= 0.3) & (t <= 0.6))[:, None], null + 4.0 * (cond - null), cond)
  np.testing.assert_allclose(out, want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out)[[0, 2]], np.asarray(cond)[[0, 2]])  # outside the interval: conditional
  # It drops into the sampler as a model_fn.
  model_fn = guidance.classifier_free(lambda x, t, y: gaussian_model(RF, "x")(x, t), labels,
                                      null_label=0, scale=2.0)
  out = samplers.sample(model_fn, x_start(3, dtype=np.float32), schedule=RF, prediction="x",
                        method="dpm_solver_2m", num_steps=4)
  assert out.shape == (3, 4) and np.all(np.isfinite(out))


# --- errors --------------------------------------------------------------------------------------

def test_clear_errors():
  def never_called(x, t):
    raise AssertionError("the model must not be called")

  kwargs = dict(schedule=RF, prediction="x", num_steps=4)
  with pytest.raises(ValueError, match=r"sampling\.method='nope'.*euler"):
    samplers.sample(never_called, x_start(), method="nope", **kwargs)
  with pytest.raises(ValueError, match=r"sampling\.method"):
    samplers.nfe("nope", 3)
  with pytest.raises(ValueError, match=r"sampling\.grid='nope'.*karras"):
    samplers.sample(never_called, x_start(), method="ddim", grid="nope", **kwargs)
  with pytest.raises(ValueError, match=r"unknown options \['etaa'\]"):
    samplers.sample(never_called, x_start(), method="ddim", etaa=1.0, **kwargs)
  with pytest.raises(ValueError, match="key"):
    samplers.sample(never_called, x_start(), method="ddim", eta=1.0, **kwargs)
  # eps-driven PNDM at alpha = 0 (rectified flow at t = 1) fails while precomputing coefficients.
  for method in ("s_pndm", "f_pndm"):
    for prediction in ("eps", "x"):
      with pytest.raises(ValueError, match=r"eps-driven.*alpha\(t_start=1.0\) = 0.*t_start < 1"):
        samplers.plan(schedule=RF, prediction=prediction, method=method, num_steps=4)
  with pytest.raises(ValueError, match=r"prediction='eps' gives no x_hat"):
    samplers.sample(never_called, x_start(), schedule=RF, prediction="eps", method="ddim", num_steps=4)
  with pytest.raises(ValueError, match=r"t_start"):
    samplers.sample(never_called, x_start(), method="edm_heun", **kwargs)


# --- config.sampling.options ---------------------------------------------------------------------

def test_config_options_default_to_the_methods_defaults():
  from configs import default
  assert default.get_config().sampling.options.to_dict() == samplers.option_defaults()


def test_config_options_reach_the_sampler_and_stray_ones_fail_at_start():
  from configs import default
  from kdiff_jax import config as config_lib, objectives, sampling
  config = default.get_config()
  config.data.name, config.data.num_classes = "synthetic", 2
  config.objective.prediction = "velocity"
  config.sampling.method, config.sampling.num_steps = "ddim", 6
  apply_fn = lambda params, x_t, t, y: params["scale"] * x_t   # any smooth "network"
  params = {"net": {"scale": jnp.float32(0.4)}}
  noise, labels = jnp.asarray(x_start(8), jnp.float32), jnp.zeros((8,), jnp.int32)

  def draw(eta, seed):
    config.sampling.options.eta = eta
    config_lib.validate(config)
    sample = sampling.build(config, objectives.describe(config), apply_fn)
    return np.asarray(sample(params, noise, labels, jax.random.key(seed)))

  np.testing.assert_array_equal(draw(0.0, 0), draw(0.0, 1))       # deterministic DDIM
  assert not np.allclose(draw(1.0, 0), draw(1.0, 1))               # ancestral: the key matters
  direct = samplers.sample(lambda x, t: 0.4 * x, noise, schedule=RF, prediction="velocity",
                           method="ddim", num_steps=6, key=jax.random.key(0), eta=1.0)
  np.testing.assert_allclose(draw(1.0, 0), direct, rtol=1e-6, atol=1e-6)

  config.sampling.method = "heun"   # eta = 1 is still set
  with pytest.raises(ValueError, match=r"sampling\.options\.eta=1\.0 has no effect.*'heun'.*\['ddim'\]"):
    config_lib.validate(config)
  config.sampling.options.eta = 0.0
  config.sampling.options.rho = 5.0
  with pytest.raises(ValueError, match=r"sampling\.options\.rho=5\.0.*grid karras"):
    config_lib.validate(config)
  config.sampling.grid = "karras"
  config_lib.validate(config)
  config.sampling.options.eta = 2.0
  with pytest.raises(ValueError, match=r"sampling\.options\.eta=2\.0: must be .*in \[0, 1\]"):
    config_lib.validate(config)
  with pytest.raises(ValueError, match=r"sampling\.options\.etaa: unknown option"):
    samplers.configured_options("ddim", "uniform_t", {"etaa": 1.0})

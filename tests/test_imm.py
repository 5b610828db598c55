"""IMM (objectives/imm.py, samplers/imm.py) against closed forms and direct re-implementations."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default, imm_in256
from kdiff_jax import data, parallel, parameterization, schedules, train, train_state
from kdiff_jax.objectives import imm
from kdiff_jax.samplers import grids
from kdiff_jax.samplers import imm as imm_sampling

RF = schedules.RectifiedFlow()
COSINE = schedules.Cosine()


def tiny_imm_config():
  """A tiny DiT IMM run on synthetic 8x8x1 images, 4 classes, M = 4."""
  config = default.get_config()
  config.data.name = "synthetic"
  config.data.image_size = 8
  config.data.channels = 1
  config.data.num_classes = 4
  config.model.size = "T"
  config.model.second_time_embedder = True
  config.objective.name = "imm"
  config.objective.noise_std = 0.5
  config.objective.t_max = 0.994
  config.training.batch_size = 32
  config.sampling.method = "pushforward"
  config.sampling.t_start = 0.994
  config.sampling.num_steps = 2
  config.sampling.grid_size = 2
  config.checkpoint.async_save = False
  return config


# --- DDIM interpolant (parameterization.ddim) ---------------------------------------------------

@pytest.mark.parametrize("schedule", [RF, COSINE], ids=["rf", "cosine"])
def test_ddim_boundaries_and_same_noise_point(schedule):
  rng = np.random.default_rng(0)
  x, n = rng.normal(size=(2, 5, 3)).astype(np.float32)
  t = np.float32(rng.uniform(0.2, 0.9, size=5))
  s = t * np.float32(rng.uniform(0.0, 1.0, size=5))
  x_t = parameterization.interpolate(x, n, t, schedule)
  np.testing.assert_allclose(parameterization.ddim(x_t, x, t, t, schedule), x_t, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(parameterization.ddim(x_t, x, np.zeros(5, np.float32), t, schedule), x,
                             atol=1e-6)
  # With the true x, DDIM lands on the same-noise point alpha_s·x + sigma_s·n (closed form).
  alpha_s, sigma_s = schedule.alpha(s)[:, None], schedule.sigma(s)[:, None]
  np.testing.assert_allclose(parameterization.ddim(x_t, x, s, t, schedule),
                             alpha_s * x + sigma_s * n, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", [RF, COSINE], ids=["rf", "cosine"])
def test_ddim_is_self_consistent(schedule):
  rng = np.random.default_rng(1)
  x_t, x = rng.normal(size=(2, 6, 4)).astype(np.float32)
  s, r, t = np.sort(rng.uniform(0.05, 0.95, size=(3, 6)).astype(np.float32), axis=0)
  two_hops = parameterization.ddim(parameterization.ddim(x_t, x, r, t, schedule), x, s, r, schedule)
  np.testing.assert_allclose(two_hops, parameterization.ddim(x_t, x, s, t, schedule), rtol=1e-5,
                             atol=1e-5)


# --- the one-step map f_{s,t} ---------------------------------------------------------------------

@pytest.mark.parametrize("f_type, schedule", list(itertools.product(imm.F_TYPES, [RF, COSINE])))
def test_map_is_identity_at_s_equals_t(f_type, schedule):
  rng = np.random.default_rng(2)
  x_t, output = rng.normal(size=(2, 5, 3)).astype(np.float32)
  t = rng.uniform(0.01, 0.99, size=5).astype(np.float32)
  np.testing.assert_allclose(imm.one_step_map(f_type, x_t, output, t, t, schedule, 0.5), x_t,
                             rtol=1e-6, atol=1e-6)


def exact_output(f_type, x, n, t, schedule, sigma_d):
  """The network output G for which f_{s,t}(alpha_t·x + sigma_t·n) = alpha_s·x + sigma_s·n (any s).

  euler_fm (rectified flow): G = (n - x)/sigma_d, the velocity over sigma_d;
  simple_edm: G = (alpha_t·n - sigma_t·x)/(sigma_d·sqrt(alpha_t^2 + sigma_t^2)), a normalised v;
  identity: G = x.
  """
  alpha, sigma = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
  if f_type == "euler_fm":
    return (n - x) / sigma_d
  if f_type == "simple_edm":
    return (alpha * n - sigma * x) / (sigma_d * np.sqrt(alpha**2 + sigma**2))
  return x


@pytest.mark.parametrize("f_type, schedule", [("euler_fm", RF), ("simple_edm", RF),
                                              ("simple_edm", COSINE), ("identity", RF),
                                              ("identity", COSINE)])
def test_map_with_the_exact_output_lands_on_the_interpolant(f_type, schedule):
  rng = np.random.default_rng(3)
  sigma_d = 0.5
  x, n = rng.normal(size=(2, 6, 3))
  n = sigma_d * n
  t = rng.uniform(0.05, 0.99, size=6)
  s = t * rng.uniform(0.0, 1.0, size=6)
  x_t = schedule.alpha(t)[:, None] * x + schedule.sigma(t)[:, None] * n
  output = exact_output(f_type, x, n, t, schedule, sigma_d)
  f = imm.one_step_map(f_type, jnp.float32(x_t), jnp.float32(output), jnp.float32(s),
                       jnp.float32(t), schedule, sigma_d)
  np.testing.assert_allclose(f, schedule.alpha(s)[:, None] * x + schedule.sigma(s)[:, None] * n,
                             rtol=2e-5, atol=2e-5)


def test_input_scale_closed_form():
  t = np.linspace(0.0, 0.994, 7).astype(np.float32)
  np.testing.assert_allclose(imm.input_scale(jnp.asarray(t), RF, 0.5),
                             1.0 / (0.5 * np.sqrt((1 - t) ** 2 + t**2)), rtol=1e-6)


# --- r(s, t) -----------------------------------------------------------------------------------

def r_closed_form(s, t, t_min, t_max, k, delta):
  """Rectified flow in float64: eta = t/(1 - t), eta^-1(e) = e/(1 + e)."""
  eta = lambda u: u / (1.0 - u)
  eta_min, eta_max = eta(t_min), eta(t_max)
  e = np.maximum(eta(t) - (eta_max - eta_min) / 2.0**k, eta_min)
  return np.maximum(s, np.minimum(t - delta, e / (1.0 + e)))


@pytest.mark.parametrize("t_min, k, delta", [(0.0, 12, 0.0), (0.006, 15, 0.0), (0.0, 12, 1e-4)])
def test_intermediate_time_formula_range_and_monotonicity(t_min, k, delta):
  t_max = 0.994
  t = np.linspace(t_min + 1e-4, t_max, 4001)
  for s0 in (t_min, 0.3, 0.9):
    s = np.minimum(s0, t)
    r = np.asarray(imm.intermediate_time(jnp.float32(s), jnp.float32(t), RF, t_min=t_min,
                                         t_max=t_max, k=k, delta=delta), np.float64)
    expected = r_closed_form(np.float32(s).astype(np.float64), np.float32(t).astype(np.float64),
                             t_min, t_max, k, delta)
    np.testing.assert_allclose(r, expected, atol=2e-6)
    valid = s < t
    assert np.all(r[valid] >= np.float32(s[valid])) and np.all(r[valid] < np.float32(t[valid]))
    assert np.all(np.diff(r[s0 <= t]) >= 0)  # monotone in t for a fixed s


def test_intermediate_time_gaps_match_the_paper():
  """docs/objectives/imm.md: T = 0.994, k = 12 give t - r = 1e-2 at t = 0.5 and 4e-4 at t = 0.9."""
  t = jnp.asarray([0.5, 0.9], jnp.float32)
  gap = t - imm.intermediate_time(jnp.zeros(2), t, RF, t_min=0.0, t_max=0.994, k=12, delta=0.0)
  np.testing.assert_allclose(gap, [1.03e-2, 4.06e-4], rtol=2e-2)


def test_sampled_times_are_ordered():
  config = tiny_imm_config()
  s, r, t = imm.sample_times(jax.random.key(0), 4096, config.objective)
  assert np.all(s >= 0) and np.all(s <= r) and np.all(r <= t) and np.all(t <= 0.994)
  assert np.all(r[s < t] < t[s < t])
  assert abs(float(np.mean(t)) - 0.497) < 0.02 and abs(float(np.mean(s / t)) - 0.5) < 0.02


# --- weighting -----------------------------------------------------------------------------------

@pytest.mark.parametrize("a, b", [(1.0, 4.0), (2.0, 4.0), (1.0, 5.0)])
def test_weight_closed_form_for_rectified_flow(a, b):
  t = np.linspace(0.01, 0.99, 50)
  log_snr = 2.0 * np.log((1.0 - t) / t)
  expected = (0.5 / (1.0 + np.exp(-(b - log_snr))) * 2.0 / (t * (1.0 - t))
              * (1.0 - t) ** a / ((1.0 - t) ** 2 + t**2))
  np.testing.assert_allclose(imm.weight(jnp.float32(t), RF, a, b), expected, rtol=1e-4)


def test_weight_is_zero_at_t_zero():
  assert float(imm.weight(jnp.float32(0.0), RF, 1.0, 4.0)) == 0.0


# --- MMD -----------------------------------------------------------------------------------------

def mmd2_direct(y_t, y_r, scale, kernel, bandwidth=1.0, estimator="v"):
  """The V- or U-statistic with explicit loops over pairs, float64."""
  m, dim = len(y_t), y_t[0].size

  def k(a, b):
    squared = float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    if kernel == "laplace":
      return np.exp(-np.sqrt(max(squared, 1e-8)) / (bandwidth * scale * dim))
    return np.exp(-squared / (2.0 * (bandwidth * scale * np.sqrt(dim)) ** 2))

  if estimator == "v":
    mean_k = lambda u, v: sum(k(a, b) for a in u for b in v) / m**2
  else:
    mean_k = lambda u, v: sum(k(u[i], v[j]) for i in range(m) for j in range(m) if i != j) / (
        m * (m - 1))
  return mean_k(y_t, y_t) + mean_k(y_r, y_r) - 2.0 * mean_k(y_t, y_r)


@pytest.mark.parametrize("kernel", imm.KERNELS)
@pytest.mark.parametrize("estimator", imm.ESTIMATORS)
def test_mmd2_matches_the_direct_statistic(kernel, estimator):
  rng = np.random.default_rng(4)
  y_t = rng.normal(size=(6, 4, 3, 2)).astype(np.float32)
  y_r = (y_t + rng.normal(size=y_t.shape)).astype(np.float32)
  scale = rng.uniform(0.01, 0.2, size=6).astype(np.float32)
  got = imm.group_mmd2(jnp.asarray(y_t), jnp.asarray(y_r), jnp.asarray(scale), kernel=kernel,
                       bandwidth=0.7, estimator=estimator)
  expected = [mmd2_direct(y_t[g], y_r[g], float(scale[g]), kernel, 0.7, estimator)
              for g in range(6)]
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kernel", imm.KERNELS)
def test_v_statistic_is_nonnegative(kernel):
  rng = np.random.default_rng(4)
  random = imm.group_mmd2(jnp.asarray(rng.normal(size=(200, 4, 5)), jnp.float32),
                          jnp.asarray(rng.normal(size=(200, 4, 5)), jnp.float32),
                          jnp.full((200,), 0.1), kernel=kernel)
  assert np.all(np.asarray(random) >= -1e-7)


def test_estimators_have_their_closed_form_expectations():
  """Paired Gaussian particles, RBF kernel: the U-statistic averages to MMD^2(P_t, P_r), the
  V-statistic to MMD^2 plus its bias (group_mmd2's docstring).

  y_t ~ N(0, I_D), y_r = rho·y_t + sqrt(1 - rho^2)·z + delta (the pairing of IMM's shared x, n).
  For W ~ N(mu, v·I_D): E exp(-|W|^2/(2h^2)) = (h^2/(h^2 + v))^(D/2)·exp(-|mu|^2/(2(h^2 + v))).
  """
  groups, m, dim, rho, h = 40000, 4, 2, 0.8, 1.5
  delta = np.array([0.6, -0.3])
  rng = np.random.default_rng(11)
  y_t = rng.normal(size=(groups, m, dim))
  y_r = rho * y_t + np.sqrt(1 - rho**2) * rng.normal(size=y_t.shape) + delta
  scale = jnp.full((groups,), h / np.sqrt(dim), jnp.float32)   # h = scale·sqrt(D)
  gauss = lambda mu2, v: (h**2 / (h**2 + v)) ** (dim / 2) * np.exp(-mu2 / (2 * (h**2 + v)))
  k_within, k_cross = gauss(0.0, 2.0), gauss(delta @ delta, 2.0)
  k_paired = gauss(delta @ delta, 2.0 * (1 - rho))
  mmd2 = 2 * k_within - 2 * k_cross
  v_bias = (2 - 2 * k_within) / m - 2 * (k_paired - k_cross) / m
  for estimator, expected in (("u", mmd2), ("v", mmd2 + v_bias)):
    values = np.asarray(imm.group_mmd2(jnp.asarray(y_t, jnp.float32), jnp.asarray(y_r, jnp.float32),
                                       scale, kernel="rbf", estimator=estimator), np.float64)
    standard_error = values.std() / np.sqrt(groups)
    assert abs(values.mean() - expected) < 4 * standard_error, (estimator, values.mean(), expected)
  assert abs(v_bias) > 20 * standard_error   # the two expectations are told apart


@pytest.mark.parametrize("kernel", imm.KERNELS)
def test_mmd2_is_zero_for_identical_groups_and_grows_with_a_shift(kernel):
  rng = np.random.default_rng(5)
  y = jnp.asarray(rng.normal(size=(1, 4, 8)), jnp.float32)
  scale = jnp.asarray([0.5])
  assert float(imm.group_mmd2(y, y, scale, kernel=kernel)[0]) == 0.0
  values = [float(imm.group_mmd2(y, y + shift, scale, kernel=kernel)[0])
            for shift in (0.5, 1.0, 2.0, 4.0)]
  assert values[0] > 0 and np.all(np.diff(values) > 0)


def test_mmd2_gradient_is_finite_on_the_diagonal():
  y = jnp.asarray(np.random.default_rng(6).normal(size=(2, 4, 3)), jnp.float32)
  grad = jax.grad(lambda y_t: jnp.sum(imm.group_mmd2(y_t, y, jnp.ones(2), kernel="laplace")))(y)
  assert np.all(np.isfinite(grad))


# --- the loss ---------------------------------------------------------------------------------

def _init(config, devices):
  setup = train.setup(config, devices)
  return setup, train.init_state(setup)


def _perturbed_net(state, seed=0, std=0.05):
  """Raw params plus noise, so adaLN gates and the final layer are non-zero."""
  rng = np.random.default_rng(seed)
  net = jax.device_get(state["params"]["net"])
  return jax.tree.map(lambda p: p + std * rng.normal(size=p.shape).astype(p.dtype), net)


def test_loss_is_invariant_to_particle_order_within_groups():
  config = tiny_imm_config()
  setup, state = _init(config, jax.devices()[:1])
  net = _perturbed_net(state)
  group_losses = jax.jit(imm.make_group_losses(config, setup.model.apply))
  rng = np.random.default_rng(7)
  groups, m = 8, 4
  x = rng.normal(size=(groups * m, 8, 8, 1)).astype(np.float32)
  n = 0.5 * rng.normal(size=x.shape).astype(np.float32)
  labels = rng.integers(0, 5, size=groups * m).astype(np.int32)
  s_, r, t = imm.sample_times(jax.random.key(1), groups, config.objective)
  weighted, mmd2 = group_losses(net, x, n, labels, labels, s_, r, t)
  order = np.concatenate([g * m + rng.permutation(m) for g in range(groups)])
  weighted_p, mmd2_p = group_losses(net, x[order], n[order], labels[order], labels[order], s_, r, t)
  # MMD^2 is a difference of O(1) kernel means: float32 summation order moves it by ~1e-7.
  np.testing.assert_allclose(weighted_p, weighted, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(mmd2) > 0)
  # Moving one particle to another group does change the loss: the grouping is real.
  swap = np.arange(groups * m)
  swap[[0, m]] = swap[[m, 0]]
  weighted_s, _ = group_losses(net, x[swap], n[swap], labels[swap], labels[swap], s_, r, t)
  assert not np.allclose(weighted_s, weighted, rtol=1e-3)
  # A group drawn at t = 0 (then s = r = 0, c_out = 0) adds 0 and keeps the gradients finite.
  zero = lambda v: v.at[0].set(0.0)
  grads = jax.grad(lambda p: jnp.sum(group_losses(p, x, n, labels, labels, zero(s_), zero(r),
                                                  zero(t))[0]))(net)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_loss_and_gradients_agree_on_one_and_eight_devices():
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    config = tiny_imm_config()
    setup, state = _init(config, devices)
    params = dict(state["params"], net=jax.device_put(_perturbed_net(state),
                                                      setup.state_shardings["params"]["net"]))
    iterator = data.build_iterator(config.data, global_batch_size=32, seed=0,
                                   sharding=parallel.batch_sharding(setup.mesh, config.mesh.rules))
    grad_fn = jax.jit(jax.value_and_grad(setup.objective.loss, has_aux=True))
    (loss, metrics), grads = grad_fn(params, next(iterator), jax.random.key(3))
    results.append(jax.device_get((loss, metrics["mmd2"], grads)))
  (loss_1, mmd_1, grads_1), (loss_8, mmd_8, grads_8) = results
  assert len(jax.devices()) == 8 and np.isfinite(loss_1) and loss_1 > 0
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
  np.testing.assert_allclose(mmd_8, mmd_1, rtol=1e-5)
  # Gradients are sums over devices in another order: compare to 1e-3 of each array's scale
  # (1e-4 of it fails here for 4 of 24576 entries of one adaLN kernel, by 1.5e-7).
  for (path, g1), g8 in zip(jax.tree_util.tree_leaves_with_path(grads_1), jax.tree.leaves(grads_8)):
    np.testing.assert_allclose(g8, g1, rtol=1e-4, atol=1e-3 * np.max(np.abs(g1)) + 1e-12,
                               err_msg=jax.tree_util.keystr(path))


def test_the_float32_target_pass_reads_the_stored_weights_in_the_train_step():
  """The train step casts the weights once to the compute dtype (state.compute_weights) unless
  the objective also runs the network in float32: IMM's target pass with target_full_precision
  must see the stored float32 weights, not their bf16 rounding."""
  config = tiny_imm_config()
  config.model.compute_dtype = "bfloat16"
  assert config.objective.imm.target_full_precision
  setup, state = _init(config, jax.devices()[:1])
  state = dict(state, params=dict(state["params"], net=jax.device_put(_perturbed_net(state))))
  batch = next(data.build_iterator(config.data, global_batch_size=32, seed=0,
                                   sharding=parallel.batch_sharding(setup.mesh, config.mesh.rules)))
  rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
  loss = jax.jit(lambda params: setup.objective.loss(params, batch, rng)[0])
  stored = float(loss(state["params"]))
  cast = float(loss(dict(state["params"], net=setup.model.compute_weights(state["params"]["net"]))))
  assert abs(cast - stored) > 1e-5 * abs(stored)   # the target pass does see the rounding
  _, metrics = train_state.make_train_step(setup)(state, batch)
  np.testing.assert_allclose(float(metrics["loss"]), stored, rtol=1e-6)


def test_group_size_must_divide_the_per_device_batch():
  config = tiny_imm_config()
  config.objective.imm.group_size = 8  # 32 over 8 devices = 4 per device
  with pytest.raises(ValueError, match="not a multiple of the objective's group size 8"):
    train.setup(config, jax.devices())


def test_no_gradient_flows_through_the_target_pass():
  """The online pass reads params['online'], the float32 target pass params['target'] only."""
  def apply_fn(net, x_t, t, labels, s=None, full_precision=False):
    p = net["target"] if full_precision else net["online"]
    time = parameterization.broadcast_time(t + 0.5 * s, x_t)
    return jnp.tanh(p["w"] * x_t + p["b"] * time + 0.1 * labels[:, None, None, None])

  config = tiny_imm_config()
  loss = imm.build(config, apply_fn)["loss"]
  rng = np.random.default_rng(8)
  batch = {"image": jnp.asarray(rng.normal(size=(16, 4, 4, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 4, size=16), jnp.int32)}
  params = {"net": {name: {"w": jnp.float32(0.8), "b": jnp.float32(0.3)}
                    for name in ("online", "target")}}
  key = jax.random.key(0)
  grads = jax.grad(lambda p: loss(p, batch, key)[0])(params)
  assert float(grads["net"]["target"]["w"]) == 0.0 and float(grads["net"]["target"]["b"]) == 0.0
  assert abs(float(grads["net"]["online"]["w"])) > 0
  # ... although the loss does depend on the target's parameters.
  moved = jax.tree.map(lambda v: v, params)
  moved["net"]["target"]["w"] = jnp.float32(1.2)
  assert float(loss(moved, batch, key)[0]) != float(loss(params, batch, key)[0])


def test_u_statistic_needs_two_particles_per_group():
  config = tiny_imm_config()
  config.objective.imm.estimator = "u"
  config.objective.imm.group_size = 1
  with pytest.raises(ValueError, match="group_size=1 must be >= 2"):
    train.setup(config, jax.devices()[:1])


def test_imm_needs_the_second_time_embedder():
  config = tiny_imm_config()
  config.model.second_time_embedder = False
  with pytest.raises(ValueError, match="second_time_embedder=True"):
    train.setup(config, jax.devices()[:1])


# --- samplers ---------------------------------------------------------------------------------

def test_grids():
  np.testing.assert_allclose(grids.time_grid(RF, 2, "cifar", t_start=0.994, t_end=0.006),
                             [0.994, 1.4 / 2.4, 0.006])
  np.testing.assert_allclose(grids.time_grid(RF, 4, "uniform_t", t_start=0.994, t_end=0.0),
                             np.linspace(0.994, 0.0, 5))
  with pytest.raises(ValueError, match="1- and 2-step"):
    grids.time_grid(RF, 4, "cifar", t_start=0.994, t_end=0.006)


def _gaussian_flow(schedule, mu, std, sigma_d):
  """The exact flow map of N(mu, std^2) data with noise N(0, sigma_d^2): an affine map."""
  c = lambda u: schedule.alpha(u) ** 2 * std**2 + schedule.sigma(u) ** 2 * sigma_d**2
  return lambda x, s, t: (schedule.alpha(s) * mu
                          + jnp.sqrt(c(s) / c(t)) * (x - schedule.alpha(t) * mu))


@pytest.mark.parametrize("num_steps", [1, 3])
def test_pushforward_and_restart_with_the_exact_map_give_the_data(num_steps):
  mu, std, sigma_d = 0.7, 0.3, 0.5
  flow = _gaussian_flow(RF, mu, std, sigma_d)
  map_fn = lambda x, output, s, t: flow(x, s[:, None], t[:, None])
  raw_fn = lambda x, s, t, y: jnp.zeros_like(x)
  noise = sigma_d * jax.random.normal(jax.random.key(0), (20000, 1))
  common = dict(schedule=RF, num_steps=num_steps, grid="uniform_t", t_start=0.994, t_end=0.0,
                null_label=1, noise_std=sigma_d)
  labels = jnp.zeros(20000, jnp.int32)
  pushed = imm_sampling.sample(raw_fn, map_fn, noise, labels, method="pushforward", **common)
  np.testing.assert_allclose(pushed, flow(noise, 0.0, 0.994), rtol=1e-4, atol=1e-5)
  restarted = imm_sampling.sample(raw_fn, map_fn, noise, labels, method="restart",
                                  key=jax.random.key(1), **common)
  assert abs(float(jnp.mean(restarted)) - mu) < 0.01
  assert abs(float(jnp.std(restarted)) - std) < 0.01
  if num_steps > 1:
    assert not np.allclose(restarted, pushed)  # restart did inject fresh noise


def ddim_loop(x_hat_fn, noise, times, schedule):
  """Deterministic DDIM written out: x <- alpha_s·x_hat + sigma_s·(x - alpha_t·x_hat)/sigma_t."""
  x = np.asarray(noise, np.float64)
  for t, s in zip(times[:-1], times[1:]):
    x_hat = np.asarray(x_hat_fn(jnp.float32(x), jnp.full(len(x), t, jnp.float32)), np.float64)
    x = schedule.alpha(s) * x_hat + schedule.sigma(s) * (x - schedule.alpha(t) * x_hat) / schedule.sigma(t)
  return x


@pytest.mark.parametrize("scan", [True, False])
def test_pushforward_with_the_identity_map_is_ddim(scan):
  x_hat_fn = lambda x, t: jnp.tanh(1.5 * x) * (1.0 - 0.5 * t[:, None])
  raw_fn = lambda x, s, t, y: x_hat_fn(x, t)
  map_fn = lambda x, output, s, t: imm.one_step_map("identity", x, output, s, t, COSINE, 0.5)
  noise = 0.5 * np.random.default_rng(9).normal(size=(64, 3)).astype(np.float32)
  times = grids.time_grid(COSINE, 4, "karras", t_start=0.99, t_end=0.01)
  sample = jax.jit(lambda noise: imm_sampling.sample(
      raw_fn, map_fn, noise, jnp.zeros(64, jnp.int32), schedule=COSINE, method="pushforward",
      num_steps=4, grid="karras", t_start=0.99, t_end=0.01, null_label=1, scan=scan))
  np.testing.assert_allclose(sample(noise), ddim_loop(x_hat_fn, noise, times, COSINE), rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize("method", imm_sampling.METHODS)
def test_guidance_acts_on_the_raw_output_and_times_reach_the_network(method):
  """Identity map to t_end = 0 returns G itself: G_w = G_null + w·(G_c - G_null) at (s, t) = (0, t_{N-1})."""
  null = 5
  raw_fn = lambda x, s, t, y: (y.astype(jnp.float32) + 10.0 * t + 100.0 * s)[:, None] + 0.0 * x
  map_fn = lambda x, output, s, t: imm.one_step_map("identity", x, output, s, t, RF, 0.5)
  labels = jnp.arange(4, dtype=jnp.int32)
  out = imm_sampling.sample(raw_fn, map_fn, jnp.ones((4, 2)), labels, schedule=RF, method=method,
                            num_steps=2, grid="uniform_t", t_start=0.8, t_end=0.0, null_label=null,
                            guidance_scale=1.5, key=jax.random.key(0))
  expected = null + 1.5 * (np.arange(4) - null) + 10.0 * 0.4
  np.testing.assert_allclose(out, np.repeat(expected[:, None], 2, 1), rtol=1e-6)


# --- the ImageNet config ----------------------------------------------------------------------

def test_in256_config_builds_the_full_model_and_mesh():
  config = imm_in256.get_config()
  config.data.latents_path = "/latents"   # read only when the data iterator starts
  setup = train.setup(config, jax.devices())
  assert config.training.batch_size == 4096 and config.objective.imm.group_size == 4
  assert 675e6 < setup.model.num_params < 680e6  # DiT-XL/2 (675M) plus the second time embedder
  assert setup.mesh.size == 8 and setup.objective.group_size == 4


def test_in256_config_runs_two_steps_with_a_tiny_model(tmp_path):
  """main.py's path with the real config, shrunk: tiny DiT, synthetic 32x32x4 latents, bf16."""
  config = imm_in256.get_config()
  config.data.name = "synthetic"
  config.model.size = "T"
  config.training.batch_size = 32
  config.training.num_steps = 2
  config.training.checkpoint_every = 2
  config.sampling.grid_size = 2
  config.checkpoint.async_save = False
  assert (config.data.image_size, config.data.channels) == (32, 4)
  assert config.model.compute_dtype == "bfloat16"
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state["step"]) == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state["params"])))
  assert (tmp_path / "samples").is_dir()


# --- the MLP -----------------------------------------------------------------------------------

def test_mlp_shapes_start_at_zero_and_use_the_second_time():
  from flax import nnx
  from kdiff_jax import models
  config = default.get_config()
  config.model.name, config.model.second_time_embedder = "mlp", True
  config.data.channels, config.data.num_classes = 2, 3
  model = models.build(config, nnx.Rngs(0))
  x, t, y = jnp.ones((5, 2)), jnp.full((5,), 0.5), jnp.zeros(5, jnp.int32)
  assert model(x, t, y, t).shape == (5, 2) and float(jnp.abs(model(x, t, y, t)).max()) == 0.0
  with pytest.raises(ValueError, match="second_time_embedder"):
    model(x, t, y)

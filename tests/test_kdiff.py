"""k-Diff (kdiff_jax/objectives/kdiff.py) against hand-derived losses, finite differences and the
flow objective; w_k through the real optimizer and trainer; the ImageNet configs run two steps."""
import glob
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from kdiff_jax import config as config_lib
from kdiff_jax import data, objectives, parallel, parameterization, sampling, schedules, schema
from kdiff_jax import train
from kdiff_jax.objectives import flow, kdiff

RF = schedules.RectifiedFlow()


def _config(**kdiff_options):
  config = default.get_config()
  config.data.image_size, config.data.channels, config.data.num_classes = 4, 2, 3
  config.objective.name = "kdiff"
  config.objective.time_sampling = "uniform"
  config.objective.min_divisor = 0.0
  config.sampling.method, config.sampling.num_steps = "euler", 4
  for name, value in kdiff_options.items():
    config.objective.kdiff[name] = value
  return config


def _linear_apply(net, x_t, t, labels, s=None, full_precision=False):
  """A stand-in network with parameters: out = a·x_t + b·t + c[label]."""
  del s, full_precision
  return net["a"] * x_t + net["b"] * t[:, None, None, None] + net["c"][labels][:, None, None, None]


def _net(seed=0):
  rng = np.random.default_rng(seed)
  return {"a": jnp.float32(rng.normal()), "b": jnp.asarray(rng.normal(size=(4, 4, 2)), jnp.float32),
          "c": jnp.asarray(rng.normal(size=4), jnp.float32)}


def _batch(batch=64, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.uniform(-1, 1, size=(batch, 4, 4, 2)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, 3, size=batch), jnp.int32)}


def _draws(batch=64, seed=0, t_low=0.0, t_high=1.0):
  """(x, n, t, x_t) in float32 with t uniform in [t_low, t_high]."""
  kx, kn, kt = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.uniform(kx, (batch, 4, 4, 2), jnp.float32, -1.0, 1.0)
  n = jax.random.normal(kn, x.shape, jnp.float32)
  t = jax.random.uniform(kt, (batch,), jnp.float32, t_low, t_high)
  return x, n, t, parameterization.interpolate(x, n, t, RF)


def _col(v):
  return v[:, None, None, None]


# --- the loss against its closed forms ----------------------------------------------------------

@pytest.mark.parametrize("k", [0.0, 0.5, 1.0, 0.27, 0.83])
def test_velocity_conversion_closed_form(k):
  """v_hat = ((2k-1)·x_t - u_hat)/Delta; k = 0, 1/2, 1 are -eps, -v/2 and x prediction."""
  x, n, t, x_t = _draws(t_low=0.1, t_high=0.9)
  u_hat = jax.random.normal(jax.random.key(7), x.shape)
  delta = k * t + (1 - k) * (1 - t)
  v_hat = parameterization.convert(u_hat, x_t, t, RF, source="u_k", target="velocity", k=k)
  np.testing.assert_allclose(v_hat, ((2 * k - 1) * x_t - u_hat) / _col(delta), rtol=1e-5, atol=1e-5)
  special = {0.0: ("eps", -u_hat), 0.5: ("velocity", -2.0 * u_hat), 1.0: ("x", u_hat)}
  if k in special:
    prediction, output = special[k]
    np.testing.assert_allclose(
        v_hat, parameterization.convert(output, x_t, t, RF, source=prediction, target="velocity"),
        rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("min_divisor", [0.0, 0.05, 0.4])
@pytest.mark.parametrize("k", [0.0, 0.5, 1.0, 0.27, 0.83])
def test_loss_is_u_error_over_clamped_delta_squared(k, min_divisor):
  """||v_hat - v||^2 = ||u_hat - u||^2 / max(Delta, m)^2, clamp on or off (docs/parameterization.md)."""
  x, n, t, x_t = _draws()
  u_hat = jax.random.normal(jax.random.key(3), x.shape)
  u = k * x - (1 - k) * n
  delta = k * t + (1 - k) * (1 - t)
  expected = jnp.mean((u_hat - u) ** 2, axis=(1, 2, 3)) / jnp.maximum(delta, min_divisor) ** 2
  got = kdiff.per_example_loss(u_hat, x, n, x_t, t, k, RF, min_divisor)
  keep = delta > 1e-3  # (without a clamp, 1/Delta^2 at Delta -> 0 amplifies rounding)
  np.testing.assert_allclose(got[keep], expected[keep], rtol=2e-4)


def test_target_does_not_depend_on_k_without_the_clamp():
  """A network that predicts a fixed velocity v0 in k's parameterization scores ||v0 - (n - x)||^2
  for every k; with the clamp on, the target is rescaled by Delta/max(Delta, m) instead."""
  x, n, t, x_t = _draws()
  v0 = jax.random.normal(jax.random.key(5), x.shape)
  losses = {}
  for k in [0.1, 0.5, 0.9]:
    delta = _col(k * t + (1 - k) * (1 - t))
    u_hat = (2 * k - 1) * x_t - delta * v0  # the u_k whose velocity is v0 (unclamped)
    losses[k] = kdiff.per_example_loss(u_hat, x, n, x_t, t, k, RF, 0.0)
    np.testing.assert_allclose(losses[k], jnp.mean((v0 - (n - x)) ** 2, axis=(1, 2, 3)), rtol=1e-4)
    clamped = kdiff.per_example_loss(u_hat, x, n, x_t, t, k, RF, 0.3)
    target = (n - x) * delta / jnp.maximum(delta, 0.3)
    expected = jnp.mean((v0 * delta / jnp.maximum(delta, 0.3) - target) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(clamped, expected, rtol=1e-4, atol=1e-6)


# --- gradients with respect to w_k --------------------------------------------------------------

def _objective(config, apply_fn=_linear_apply):
  return objectives.build(config, apply_fn)


def test_grad_w_k_matches_finite_differences_and_closed_form():
  config = _config(w_k_scale=1.0, k_init=0.7)
  objective = _objective(config)
  batch, rng = _batch(), jax.random.key(11)
  params = {"net": _net(), **objective.extra_params}
  loss_at = lambda w: objective.loss(dict(params, w_k=jnp.float32(w)), batch, rng)[0]
  w0 = float(params["w_k"])
  grad = float(jax.grad(lambda p: objective.loss(p, batch, rng)[0])(params)["w_k"])
  h = 1e-2
  finite = (float(loss_at(w0 + h)) - float(loss_at(w0 - h))) / (2 * h)
  assert abs(grad) > 1e-2
  assert grad == pytest.approx(finite, rel=2e-3)
  # dL/dk = mean 2·(v_hat - v)·dv_hat/dk,
  # dv_hat/dk = (2·x_t·Delta - ((2k-1)·x_t - u_hat)·(2t-1)) / Delta^2, dk/dw = k·(1-k)
  x, n, t, x_t, labels = flow.noised_batch(batch, rng, config, RF)
  u_hat = _linear_apply(params["net"], x_t, t, labels)
  k = float(jax.nn.sigmoid(w0))
  tt = _col(t)
  delta = k * tt + (1 - k) * (1 - tt)
  v_hat = ((2 * k - 1) * x_t - u_hat) / delta
  dv_dk = (2 * x_t * delta - ((2 * k - 1) * x_t - u_hat) * (2 * tt - 1)) / delta ** 2
  closed = float(jnp.mean(jnp.mean(2 * (v_hat - (n - x)) * dv_dk, axis=(1, 2, 3)))) * k * (1 - k)
  assert grad == pytest.approx(closed, rel=1e-3)


def test_with_the_clamp_the_target_gets_no_gradient():
  """Clamp active: autodiff equals finite differences of the loss with the target's k held
  fixed, and differs from finite differences of the whole loss (which would move the target)."""
  config = _config(k_init=0.8)
  config.objective.min_divisor = 0.45
  objective = _objective(config)
  batch, rng = _batch(), jax.random.key(2)
  params = {"net": _net(1), **objective.extra_params}
  w0 = float(params["w_k"])
  grad = float(jax.grad(lambda p: objective.loss(p, batch, rng)[0])(params)["w_k"])
  x, n, t, x_t, labels = flow.noised_batch(batch, rng, config, RF)
  u_hat = _linear_apply(params["net"], x_t, t, labels)

  def loss(w_prediction, w_target):
    k, k_bar = jax.nn.sigmoid(w_prediction), jax.nn.sigmoid(w_target)
    tt = _col(t)
    delta, delta_bar = k * tt + (1 - k) * (1 - tt), k_bar * tt + (1 - k_bar) * (1 - tt)
    v_hat = ((2 * k - 1) * x_t - u_hat) / jnp.maximum(delta, 0.45)
    v = (n - x) * delta_bar / jnp.maximum(delta_bar, 0.45)
    return float(jnp.mean((v_hat - v) ** 2))

  h = 1e-2
  fixed_target = (loss(w0 + h, w0) - loss(w0 - h, w0)) / (2 * h)
  whole = (loss(w0 + h, w0 + h) - loss(w0 - h, w0 - h)) / (2 * h)
  assert grad == pytest.approx(fixed_target, rel=2e-3)
  assert abs(whole - fixed_target) > 0.05 * abs(fixed_target)


# --- frozen k: the eps / v / x baselines -----------------------------------------------------------

@pytest.mark.parametrize("k, prediction, scale", [(0.0, "eps", -1.0), (0.5, "velocity", -2.0),
                                                   (1.0, "x", 1.0)])
def test_frozen_k_is_the_flow_baseline(k, prediction, scale):
  """k-Diff at fixed k = 0, 1/2, 1 has the loss and the gradients of flow's eps / velocity / x
  prediction (velocity loss) of a network whose output is scaled by -1, -2, 1."""
  config = _config(learnable=False, k_init=k)
  config.objective.t_min, config.objective.t_max = 0.02, 0.98
  objective = _objective(config)
  assert objective.extra_params == {}
  baseline_config = _config()
  baseline_config.objective.name = "flow"
  baseline_config.objective.prediction, baseline_config.objective.loss_target = prediction, "velocity"
  baseline_config.objective.t_min, baseline_config.objective.t_max = 0.02, 0.98
  baseline = _objective(baseline_config, lambda *args: scale * _linear_apply(*args))
  batch, rng, params = _batch(), jax.random.key(4), {"net": _net(2)}
  (loss, metrics), grads = jax.value_and_grad(objective.loss, has_aux=True)(params, batch, rng)
  (loss_b, _), grads_b = jax.value_and_grad(baseline.loss, has_aux=True)(params, batch, rng)
  assert float(metrics["k"]) == k
  assert float(loss) == pytest.approx(float(loss_b), rel=1e-5)
  for name in params["net"]:
    np.testing.assert_allclose(grads["net"][name], grads_b["net"][name], rtol=1e-4, atol=1e-6)


def test_frozen_k_one_is_jits_clamped_x_loss():
  """k = 1 with clamp 0.05: JiT's loss ||x_hat - x||^2 / max(t, 0.05)^2, for t below 0.05 too."""
  config = _config(learnable=False, k_init=1.0)
  config.objective.min_divisor = 0.05
  config.objective.t_max = 0.2  # many t < 0.05
  objective = _objective(config)
  batch, rng, params = _batch(), jax.random.key(6), {"net": _net(3)}
  x, n, t, x_t, labels = flow.noised_batch(batch, rng, config, RF)
  x_hat = _linear_apply(params["net"], x_t, t, labels)
  expected = jnp.mean(jnp.mean((x_hat - x) ** 2, axis=(1, 2, 3)) / jnp.maximum(t, 0.05) ** 2)
  assert int(jnp.sum(t < 0.05)) > 5
  assert float(objective.loss(params, batch, rng)[0]) == pytest.approx(float(expected), rel=1e-5)


# --- time-dependent k ---------------------------------------------------------------------------

def test_time_dependent_k():
  config = _config(time_dependent=True, k_init=0.6, w_k_scale=2.0)
  objective = _objective(config)
  assert objective.extra_params["w_k"].shape == (2,)
  batch, rng, net = _batch(), jax.random.key(8), _net(4)
  constant = _objective(_config(k_init=0.6, w_k_scale=2.0))
  loss_td, metrics = objective.loss({"net": net, "w_k": jnp.array([0.3, 0.3])}, batch, rng)
  loss_c, _ = constant.loss({"net": net, "w_k": jnp.float32(0.3)}, batch, rng)
  assert float(loss_td) == pytest.approx(float(loss_c), rel=1e-6)
  w = jnp.array([-0.4, 0.9])
  _, metrics = objective.loss({"net": net, "w_k": w}, batch, rng)
  assert float(metrics["k_data"]) == pytest.approx(float(jax.nn.sigmoid(-0.8)), rel=1e-6)
  assert float(metrics["k_noise"]) == pytest.approx(float(jax.nn.sigmoid(1.8)), rel=1e-6)
  t = flow.noised_batch(batch, rng, config, RF)[2]
  k_t = jax.nn.sigmoid(2.0 * ((1 - t) * -0.4 + t * 0.9))
  assert float(metrics["k"]) == pytest.approx(float(jnp.mean(k_t)), rel=1e-5)
  grad = jax.grad(lambda p: objective.loss(p, batch, rng)[0])({"net": net, "w_k": w})["w_k"]
  assert np.all(np.abs(np.asarray(grad)) > 1e-4)


# --- sampling with the parameters' k ------------------------------------------------------------

@pytest.mark.parametrize("time_dependent", [False, True])
def test_sampling_uses_the_given_params_k(time_dependent):
  """Data = one point x0. The exact u_k network for k(t) (u = k·x0 - (1-k)·n_hat) sampled with
  Euler lands on x0 when sampled with the params' own w_k, and elsewhere with another w_k."""
  config = _config(time_dependent=time_dependent, w_k_scale=1.5)
  config.objective.min_divisor = 0.05
  x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, size=(1, 4, 4, 2)), jnp.float32)
  w_true = jnp.array([0.4, 1.6]) if time_dependent else jnp.float32(1.1)

  def exact_apply(net, x_t, t, labels, s=None, full_precision=False):
    k = _col(kdiff.k_of({"w_k": w_true}, t, config.objective.kdiff) * jnp.ones_like(t))
    n_hat = (x_t - (1 - _col(t)) * x0) / _col(t)
    return k * x0 - (1 - k) * n_hat

  objective = _objective(config, exact_apply)
  sampler = sampling.build(config, objective.description, exact_apply)
  noise = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
  labels = jnp.zeros(3, jnp.int32)
  sample = lambda w: sampler({"net": {}, "w_k": w}, noise, labels, jax.random.key(1))
  np.testing.assert_allclose(sample(w_true), jnp.broadcast_to(x0, noise.shape), atol=1e-4)
  assert float(jnp.abs(sample(w_true - 0.7) - x0).max()) > 0.05


# --- w_k in the optimizer and the trainer -------------------------------------------------------

def test_w_k_is_never_weight_decayed():
  """train.make_optimizer with a large weight decay: with zero gradients AdamW moves only the
  matrices (by -lr·wd·p); with gradients w_k moves exactly as under plain Adam."""
  config = _config(k_init=0.8)
  config.optimizer.learning_rate, config.optimizer.weight_decay = 0.1, 0.5
  optimizer = train.make_optimizer(config.optimizer, num_steps=10)
  extra = _objective(config).extra_params
  params = {"net": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}, **extra}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zeros, optimizer.init(params), params)
  np.testing.assert_allclose(updates["net"]["kernel"], -0.1 * 0.5 * jnp.ones((3, 3)), rtol=1e-6)
  assert float(updates["w_k"]) == 0.0 and np.all(np.asarray(updates["net"]["bias"]) == 0.0)
  grads = jax.tree.map(lambda p: 0.3 * jnp.ones_like(p), params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  adam = optax.adam(0.1, b1=config.optimizer.b1, b2=config.optimizer.b2, eps=config.optimizer.eps)
  expected, _ = adam.update(grads, adam.init(params), params)
  assert float(updates["w_k"]) == pytest.approx(float(expected["w_k"]), rel=1e-6)
  assert float(updates["net"]["kernel"][0, 0]) != pytest.approx(float(expected["net"]["kernel"][0, 0]))


def _tiny_trainer_config():
  config = default.get_config()
  config.data.name, config.data.image_size, config.data.channels = "synthetic", 8, 1
  config.data.num_classes = 4
  config.model.size, config.model.patch_size = "T", 2
  config.objective.name = "kdiff"
  config.objective.min_divisor = 0.05
  config.objective.kdiff.w_k_scale = 10.0
  config.optimizer.learning_rate, config.optimizer.weight_decay = 1e-2, 0.5
  config.training.batch_size, config.training.ema_decays = 8, (0.5,)
  config.training.per_step_metrics = ("k",)
  config.mesh.data = 1
  return config


def test_trainer_trains_w_k_tracks_it_in_the_ema_and_logs_k():
  config = _tiny_trainer_config()
  setup = train.setup(config, jax.devices()[:1])
  state = train.init_state(setup)
  step = train.make_train_step(setup)
  iterator = data.build_iterator(config.data, global_batch_size=8, seed=0,
                                 sharding=parallel.batch_sharding(setup.mesh, config.mesh.rules))
  w_k = float(state["params"]["w_k"])
  ema = float(state["ema"]["0.5"]["w_k"])
  assert w_k == ema == 0.0
  for _ in range(2):
    state, metrics = step(state, next(iterator))
    assert float(metrics["k"]) == pytest.approx(float(jax.nn.sigmoid(10.0 * w_k)), rel=1e-6)
    new_w_k = float(state["params"]["w_k"])
    assert abs(new_w_k - w_k) > 1e-3  # trained with the network's learning rate (about 1e-2)
    ema = 0.5 * ema + 0.5 * new_w_k
    assert float(state["ema"]["0.5"]["w_k"]) == pytest.approx(ema, rel=1e-6)
    w_k = new_w_k
  assert float(train.sampling_params(state, config)["w_k"]) == pytest.approx(ema, rel=1e-6)


def _scalars(workdir, tags=("k", "loss")):
  """{tag: {step: value}} of the scalars `tags` in the TensorBoard events in workdir."""
  import tensorflow as tf
  out = {}
  for path in glob.glob(str(workdir / "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag in tags:
          out.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  return out


def test_k_is_written_every_step_and_the_loss_every_log_every(tmp_path):
  config = _tiny_trainer_config()
  config.training.num_steps, config.training.log_every = 6, 3
  config.training.checkpoint_every = 6
  config.checkpoint.async_save = False
  config.mesh.data = -1   # all 8 simulated devices, in the run and in the replay
  # No sample grids (not what is tested; test_in256_configs_run_two_steps draws them): the run's
  # compiled step is the replay's.
  train.train_and_evaluate(config, str(tmp_path), sampling_actions=lambda context: ())
  scalars = _scalars(tmp_path)

  # The same steps replayed by hand: the step's k and the loss averaged over 3 steps.
  setup = train.setup(config)
  state, step = train.init_state(setup), train.make_train_step(setup)
  iterator = data.build_iterator(config.data, global_batch_size=8, seed=config.seed,
                                 sharding=parallel.batch_sharding(setup.mesh, config.mesh.rules))
  ks, losses = [], []
  for _ in range(6):
    state, metrics = step(state, next(iterator))
    ks.append(float(metrics["k"]))
    losses.append(float(metrics["loss"]))
  assert sorted(scalars["k"]) == [1, 2, 3, 4, 5, 6] and ks[0] == 0.5 and len(set(ks)) == 6
  np.testing.assert_allclose([scalars["k"][i] for i in range(1, 7)], ks, rtol=1e-5)
  assert sorted(scalars["loss"]) == [3, 6]
  np.testing.assert_allclose([scalars["loss"][3], scalars["loss"][6]],
                             [np.mean(losses[:3]), np.mean(losses[3:])], rtol=1e-5)


# --- configs ------------------------------------------------------------------------------------

def test_kdiff_options_are_validated():
  config = _config(k_init=1.0)
  with pytest.raises(ValueError, match=r"objective.kdiff.k_init=1.0: must be in \(0, 1\)"):
    _objective(config)
  with pytest.raises(ValueError, match="time_dependent=True needs"):
    _objective(_config(learnable=False, time_dependent=True))
  bad = _config(k_init=1.5)
  with pytest.raises(ValueError, match=r"objective.kdiff.k_init=1.5: must be .*in \[0, 1\]"):
    config_lib.validate(bad)


@pytest.mark.parametrize("baseline, kdiff_name, k", [("fm_in256_latent", "kdiff_in256_latent", 0.5),
                                                     ("jit_in256", "kdiff_in256_pixel", 1.0)])
def test_baselines_differ_only_in_the_target(baseline, kdiff_name, k):
  base = schema.flatten(importlib.import_module(f"configs.{baseline}").get_config())
  ours = schema.flatten(importlib.import_module(f"configs.{kdiff_name}").get_config())
  changed = {key for key in ours if ours[key] != base[key]}
  assert "objective.kdiff.learnable" in changed
  assert changed <= {"objective.kdiff.learnable", "objective.kdiff.k_init"}
  assert base["objective.kdiff.learnable"] is False and base["objective.kdiff.k_init"] == k
  assert ours["objective.kdiff.learnable"] is True and ours["objective.name"] == "kdiff"


@pytest.mark.parametrize("name", ["kdiff_in256_pixel", "kdiff_in256_latent"])
def test_in256_configs_run_two_steps(name, tmp_path):
  """The real configs with a tiny model, synthetic data of the real shape, 2 steps + samples."""
  config = importlib.import_module(f"configs.{name}").get_config()
  if config.data.name == "latents":
    config.data.latents_path = "/latents"   # read only when the data iterator starts
  config_lib.validate(config)
  shape = (config.data.image_size, config.data.channels)
  config.data.name = "synthetic"
  config.model.size = "T"
  config.training.batch_size, config.training.num_steps = 8, 2
  config.training.log_every, config.training.checkpoint_every = 1, 2
  config.sampling.num_steps, config.sampling.grid_size = 2, 1
  config.checkpoint.async_save = False
  state = jax.device_get(train.train_and_evaluate(config, str(tmp_path)))
  assert shape == ((256, 3) if name.endswith("pixel") else (32, 4))
  assert int(state["step"]) == 2
  assert float(state["params"]["w_k"]) != 0.0
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(state["params"]))
  assert glob.glob(str(tmp_path / "samples" / "step_*.png"))

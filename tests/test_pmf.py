"""Pixel MeanFlow (kdiff_jax/objectives/pmf.py): the loss from fixed draws against an independent
float64 NumPy implementation of the recipe (docs/objectives/pmf.md) with an injected perceptual
distance, du/dt against a float64 finite difference through the x-to-u conversion, the cheaper
step against the official full-batch one, pMF's draw order, and the config checks.

The networks here predict images and convert them as pMF's does, u = (z - x̂_u)/clip(t, 0.05, 1):
an analytic two-headed one for the reference, and a tiny pMF DiT for the derivative, step and
device tests.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdiff_jax import config as config_lib, objectives, parallel, perceptual, state, train_state
from kdiff_jax.objectives import flow, meanflow, pmf
from kdiff_jax.models import pmf_dit
from tests.test_imf_reference import _heads
from tests.test_meanflow import assert_trees_close

CLASSES = 10
FLOOR = 0.05
_RNG = np.random.default_rng(7)
MAPS = {"lpips": _RNG.normal(size=(16, 5)) / 4, "convnext": _RNG.normal(size=(16, 3)) / 4}


def pmf_config():
  from configs.default import get_config
  config = get_config()
  config.data.name, config.data.image_size, config.data.channels = "digits", 4, 1
  config.data.num_classes = CLASSES
  config.model.name, config.model.size, config.model.patch_size = "pmf_dit", "T", 2
  config.model.second_time_embedder, config.model.time_scale = True, 1.0
  config.objective.name, config.objective.schedule = "pmf", "rectified_flow"
  config.objective.time_sampling = "logit_normal"
  config.objective.logit_normal_mean = config.objective.logit_normal_std = 0.8  # B/16's
  config.objective.label_dropout = 0.25
  config.sampling.method = "mean_flow"
  config.sampling.guidance_scale, config.sampling.guidance_interval = 3.0, (0.1, 0.7)
  return config


def converted(xp, z, t, x_u, x_v):
  """pMF's network output: (u, v) = ((z - x̂_u), (z - x̂_v))/clip(t, floor, 1)."""
  scale = xp.clip(t, FLOOR, 1.0)[:, None, None, None]
  return (z - x_u) / scale, (z - x_v) / scale


def analytic_apply(net_params, z, t, labels, h, *, guidance, interval, v_head=False, u_head=True):
  """The objective's network call on `_heads` read as the two x-predictions, in float32."""
  del net_params
  u, v = converted(jnp, z, t, *_heads(jnp, z, t, h, guidance, interval[0], interval[1], labels))
  if v_head and u_head:
    return u, v
  return v if v_head else u


def distances(xp, x_hat, x, maps):
  """A closed-form stand-in for the feature distances: squared distances of fixed linear maps
  of the flattened images (the second through tanh)."""
  flat = lambda a: a.reshape(a.shape[0], -1)
  diff = flat(x_hat) - flat(x)
  feature = lambda a: xp.tanh(flat(a) @ maps["convnext"])
  return {"lpips": xp.sum((diff @ maps["lpips"]) ** 2, axis=1),
          "convnext": xp.sum((feature(x_hat) - feature(x)) ** 2, axis=1)}


def injected_distance(frozen, key, x_hat, x):
  """pmf's distance(frozen, key, x_hat, x): the maps are the 'frozen' weights the loss hands on."""
  assert jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  return distances(jnp, x_hat, x, frozen)


def reference_losses(x, labels, d, *, p, c, lambdas, max_t):
  """pMF's per-example (loss, L_u, L_v, masked distances) in float64 NumPy, from the formulas."""
  col = lambda a: a[:, None, None, None]
  t, r, e, omega = d["t"], d["r"], d["noise"], d["omega"]
  z = (1 - col(t)) * x + col(t) * e
  v_t = (z - x) / col(np.clip(t, FLOOR, 1.0))
  net = lambda z_, t_, h, w, lo, hi, y: converted(np, z_, t_, *_heads(np, z_, t_, h, w, lo, hi, y))
  zero, one = np.zeros_like(t), np.ones_like(t)
  omega_w = np.where((t >= d["t_min"]) & (t <= d["t_max"]), omega, 1.0)
  v_c = net(z, t, zero, omega_w, zero, one, labels)[1]
  v_u = net(z, t, zero, one, zero, one, np.full_like(labels, CLASSES))[1]
  v_g = np.where(col(d["dropped"]), v_t, v_t + col(1 - 1 / omega_w) * (v_c - v_u))
  train = lambda z_, t_: net(z_, t_, t_ - r, omega, d["t_min"], d["t_max"], d["labels"])
  eps = 1e-6
  du_dt = (train(z + eps * v_c, t + eps)[0] - train(z - eps * v_c, t - eps)[0]) / (2 * eps)
  u, v_head = train(z, t)
  weight = lambda error: error / (error + c) ** p
  error_u = np.sum((u + col(t - r) * du_dt - v_g) ** 2, axis=(1, 2, 3))
  error_v = np.sum((v_head - v_g) ** 2, axis=(1, 2, 3))
  loss = weight(error_u) + weight(error_v)
  masked = {name: np.where(t < max_t, value, 0.0)
            for name, value in distances(np, z - col(t) * u, x, MAPS).items()}
  for name, lambda_ in lambdas.items():
    loss = loss + lambda_ * weight(masked[name])
  return loss, error_u, error_v, masked


@pytest.mark.parametrize("perceptual", [True, False], ids=["perceptual", "plain"])
@pytest.mark.parametrize("full_batch_jvp", [False, True], ids=["ours", "official"])
def test_loss_from_fixed_draws_matches_a_float64_reference(full_batch_jvp, perceptual):
  config = pmf_config()
  options = config.objective.pmf
  options.full_batch_jvp = full_batch_jvp
  lambdas = {"lpips": 0.4, "convnext": 0.1} if perceptual else {}
  options.lpips_weight, options.convnext_weight = lambdas.get("lpips", 0), lambdas.get("convnext", 0)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 4, 4, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, CLASSES, size=32))
  draws = pmf.draw(jax.random.key(3), x, labels, config)
  # Below the floor: an r = t row (0) and an r < t row (1), where v_t and u are divided by 0.05.
  t, r = np.asarray(draws.t).copy(), np.asarray(draws.r).copy()
  t[0] = r[0] = 0.03
  t[1], r[1] = 0.04, 0.01
  draws = dataclasses.replace(draws, t=jnp.asarray(t), r=jnp.asarray(r))
  example_losses = pmf.make_example_losses(config, analytic_apply, injected_distance)
  maps = {name: jnp.asarray(m, jnp.float32) for name, m in MAPS.items()}
  ours = jax.jit(example_losses)(None, x, labels, draws, frozen=maps)
  as_np = {k: np.asarray(v, np.float64 if np.asarray(v).dtype.kind == "f" else None)
           for k, v in vars(draws).items() if k != "crop"}
  loss, error_u, error_v, masked = reference_losses(
      np.asarray(x, np.float64), np.asarray(labels), as_np, p=options.adaptive_p,
      c=options.adaptive_c, lambdas=lambdas, max_t=options.perceptual_max_t)
  # Every branch: dropped rows, rows outside their interval, r = t and r < t, t on both sides of
  # the floor and of perceptual_max_t.
  t, r = as_np["t"], as_np["r"]
  outside = (t < as_np["t_min"]) | (t > as_np["t_max"])
  assert as_np["dropped"].any() and outside.any() and (t == r).any() and (t > r).any()
  assert (t >= options.perceptual_max_t).any() and (t < FLOOR).any()
  np.testing.assert_allclose(ours["error_u"], error_u, rtol=3e-4)
  np.testing.assert_allclose(ours["error_v"], error_v, rtol=3e-4)
  np.testing.assert_allclose(ours["loss"], loss, rtol=3e-4)
  if perceptual:
    for name in lambdas:
      np.testing.assert_allclose(ours[name], masked[name], rtol=3e-4, atol=1e-9)
      assert np.all(np.asarray(ours[name])[t >= options.perceptual_max_t] == 0)
      assert np.all(masked[name][t < options.perceptual_max_t] > 0)
  else:
    assert "lpips" not in ours and "convnext" not in ours


# --- draws --------------------------------------------------------------------------------------

@pytest.mark.parametrize("tr_uniform", [False, True])
def test_times_are_drawn_then_set_equal_then_ordered(tr_uniform):
  """pMF's order: two logit-normal draws a, b (with tr_uniform, a tenth of the rows redrawn
  uniformly), THEN r = t on the layout's rows, THEN max and min: on an r = t row t = a alone."""
  config = pmf_config()
  config.objective.pmf.tr_uniform = tr_uniform
  batch, key = 4096, jax.random.key(11)
  t, r = jax.device_get(pmf.sample_times(key, batch, config))
  rng_a, rng_b, rng_uniform = jax.random.split(key, 3)
  a = np.asarray(flow.sample_time(rng_a, batch, config.objective))
  b = np.asarray(flow.sample_time(rng_b, batch, config.objective))
  if tr_uniform:
    rng_rows, rng_ua, rng_ub = jax.random.split(rng_uniform, 3)
    uniform = np.asarray(jax.random.uniform(rng_rows, (batch,))) < 0.1
    a = np.where(uniform, np.asarray(jax.random.uniform(rng_ua, (batch,))), a)
    b = np.where(uniform, np.asarray(jax.random.uniform(rng_ub, (batch,))), b)
    assert 0.08 < uniform.mean() < 0.12
  equal = np.asarray(meanflow.r_equals_t_rows(batch, 0.5))
  np.testing.assert_array_equal(t[equal], a[equal])
  np.testing.assert_array_equal(r[equal], a[equal])
  np.testing.assert_array_equal(t[~equal], np.maximum(a, b)[~equal])
  np.testing.assert_array_equal(r[~equal], np.minimum(a, b)[~equal])
  # iMF's order (max first) would give the r = t rows the max of two: a different law.
  assert abs(np.median(t[equal]) - np.median(np.maximum(a, b)[equal])) > 0.03


def test_draws_lay_out_interval_dropout_noise_and_omega():
  config = pmf_config()
  config.objective.noise_std = 2.0
  x = jnp.zeros((64, 4, 4, 1))
  draws = jax.device_get(pmf.draw(jax.random.key(0), x, jnp.arange(64) % CLASSES, config))
  equal = np.asarray(meanflow.r_equals_t_rows(64, 0.5))
  np.testing.assert_array_equal(draws.r == draws.t, equal)
  assert np.all(draws.t_min[equal] == 0) and np.all(draws.t_max[equal] == 1)
  assert np.all(draws.t_min[~equal] <= 0.5) and np.all(draws.t_max[~equal] >= 0.5)
  assert 1.6 < np.std(draws.noise) < 2.4
  assert np.all((draws.omega >= 1) & (draws.omega <= 8))
  dropped = draws.dropped
  assert 0 < dropped.sum() and np.all(draws.labels[dropped] == CLASSES)
  # Dropped rows are the r = t rows first.
  assert np.all(equal[dropped]) or np.all(dropped[equal])


# --- the x-predicting DiT: du/dt and the cheaper step --------------------------------------------

def _x_prediction_dit(dtype, seed=0):
  """A tiny pMF DiT (models/pmf_dit.py: x-predicting heads converted to (u, v) with its t) with
  perturbed weights: apply(net, z, t, y, h, **conditioning) -> (z - x̂)/clip(t, 0.05, 1)."""
  model = pmf_dit.PmfDiT(input_size=4, in_channels=1, patch_size=2, hidden_size=32, depth=2,
                         num_heads=2, head_depth=1, bottleneck_dim=8, num_classes=CLASSES,
                         t_floor=FLOOR, dtype=dtype, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(seed + 1)
  params = jax.tree.map(lambda p: jnp.asarray(p + 0.1 * rng.normal(size=p.shape), dtype), params)
  return (lambda net, *args, **kwargs: nnx.merge(graphdef, net)(*args, **kwargs)), params


def _fixed_draws(dtype=jnp.float32):
  """Rows: r = t on 0, 2, 4, 6 (share 1/2); dropped 0 and 3; 1 and 5 outside their interval;
  t below the floor on 6 (r = t) and 7 (r < t)."""
  equal = np.arange(8) % 2 == 0
  t = np.array([0.5, 0.9, 0.3, 0.55, 0.8, 0.2, 0.03, 0.045])
  r = np.where(equal, t, t - np.array([0, 0.3, 0, 0.4, 0, 0.1, 0, 0.03]))
  t_min = np.where(equal, 0.0, [0, 0.1, 0, 0.2, 0, 0.3, 0, 0.0])
  t_max = np.where(equal, 1.0, [1, 0.6, 1, 0.9, 1, 0.7, 1, 0.8])
  dropped = np.isin(np.arange(8), [0, 3])
  rng = np.random.default_rng(2)
  labels = np.arange(8) % CLASSES
  cast = lambda a: jnp.asarray(a, dtype)
  draws = pmf.Draws(cast(t), cast(r), cast(rng.normal(size=(8, 4, 4, 1))),
                    jnp.asarray(np.where(dropped, CLASSES, labels)), jnp.asarray(dropped),
                    jnp.asarray(1 + 7 * rng.uniform(size=8), jnp.float32), cast(t_min),
                    cast(t_max), jax.random.key(0))
  return cast(rng.normal(size=(8, 4, 4, 1))), jnp.asarray(labels), draws


def test_cheaper_step_equals_the_official_full_batch_step():
  """Same per-example losses, V, v_g, x̂ and gradients, with the perceptual terms on."""
  apply, net = _x_prediction_dit(jnp.float32)
  x, labels, draws = _fixed_draws()
  maps = {name: jnp.asarray(m, jnp.float32) for name, m in MAPS.items()}
  results = []
  for full in (True, False):
    config = pmf_config()
    config.objective.pmf.full_batch_jvp = full
    config.objective.pmf.lpips_weight, config.objective.pmf.convnext_weight = 0.4, 0.1
    example_losses = pmf.make_example_losses(config, apply, injected_distance)

    def total(net):
      losses = example_losses(net, x, labels, draws, frozen=maps)
      return jnp.mean(losses["loss"]), losses

    results.append(jax.jit(jax.value_and_grad(total, has_aux=True))(net))
  ((_, full), g_full), ((_, cheap), g_cheap) = results
  for key in ("loss", "error_u", "error_v", "compound", "guided", "x_hat", "lpips", "convnext"):
    np.testing.assert_allclose(cheap[key], full[key], rtol=2e-5, atol=1e-6, err_msg=key)
  assert np.all(np.asarray(full["error_u"]) > 0) and np.any(np.asarray(full["lpips"]) > 0)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_full), jax.tree.leaves(g_cheap)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.max(np.abs(a)) + 1e-9,
                               err_msg=jax.tree_util.keystr(path))


def test_du_dt_through_the_conversion_matches_a_float64_finite_difference():
  """(V - u)/(t - r) = d/dε u(z + ε·v_c, t + ε, r) at ε = 0, central differences in float64 on a
  float64 network whose u = (z - x̂_u)/clip(t, 0.05, 1): the conversion's -u/t term is in du/dt
  (the rows with t above the floor), and absent below it (row 7)."""
  with jax.enable_x64(True):
    config = pmf_config()
    config.objective.pmf.full_batch_jvp = True
    apply, net = _x_prediction_dit(jnp.float64)
    x, labels, d = _fixed_draws(jnp.float64)
    losses = jax.jit(pmf.make_example_losses(config, apply))(net, x, labels, d)
    assert losses["compound"].dtype == jnp.float64
    z = (1 - d.t)[:, None, None, None] * x + d.t[:, None, None, None] * d.noise
    omega_w = jnp.where((d.t >= d.t_min) & (d.t <= d.t_max), d.omega, 1.0)
    zeros, ones = jnp.zeros(8), jnp.ones(8)
    v_c = apply(net, z, d.t, labels, zeros, guidance=omega_w, interval=(zeros, ones),
                v_head=True, u_head=False)
    u_at = jax.jit(lambda eps: apply(net, z + eps * v_c, d.t + eps, d.labels, d.t + eps - d.r,
                                     guidance=d.omega, interval=(d.t_min, d.t_max)))
    eps = 1e-3  # the embedders see h in float32: rounding ~3e-8/eps; row 7 stays below the floor
    finite = (u_at(eps) - u_at(-eps)) / (2 * eps)
    u = u_at(0.0)
    unequal = np.asarray(d.t != d.r)
    du_dt = (losses["compound"] - u) / (d.t - d.r + ~unequal)[:, None, None, None]
    for row in np.flatnonzero(unequal):   # row 7's derivative is 20x larger (divided by 0.05)
      scale = float(jnp.max(jnp.abs(finite[row])))
      assert scale > 1e-2
      np.testing.assert_allclose(du_dt[row], finite[row], atol=5e-4 * scale, err_msg=row)
    np.testing.assert_allclose(losses["x_hat"], z - d.t[:, None, None, None] * u, atol=1e-7)


def test_build_hands_the_frozen_nets_and_the_crop_to_the_perceptual_terms():
  """objectives.build: the frozen loader (tiny random LPIPS and ConvNeXt), and a loss whose
  perceptual terms are perceptual.distances on the draws' crop key, masked at t < 0.8."""
  config = pmf_config()
  config.data.name, config.data.channels = "synthetic", 3
  config.objective.pmf.lpips_weight, config.objective.pmf.convnext_weight = 0.4, 0.1
  config.perceptual.random_weights, config.perceptual.crop_size = "tiny", 32
  config_lib.validate(config)
  model = state.build_model(config)
  without = objectives.build(config, model.apply)   # sampling's: the loss refuses to run
  assert without.frozen is None
  objective = objectives.build(config, model.apply, feature_nets=perceptual)
  frozen = objective.frozen()
  assert set(frozen) == {"lpips", "convnext"}
  rng = np.random.default_rng(0)
  net = jax.tree.map(lambda p: p + 0.05 * rng.normal(size=p.shape).astype(p.dtype),
                     jax.device_get(state.init_net(config)))
  x = jnp.asarray(rng.uniform(-1, 1, size=(8, 4, 4, 3)), jnp.float32)
  labels, key = jnp.arange(8) % CLASSES, jax.random.key(1)
  loss, metrics = jax.jit(objective.loss)({"net": net}, {"image": x, "label": labels}, key,
                                          frozen=frozen)
  with pytest.raises(ValueError, match="feature_nets=kdiff_jax.perceptual"):
    jax.eval_shape(without.loss, {"net": net}, {"image": x, "label": labels}, key)
  draws = pmf.draw(key, x, labels, config)
  plain = pmf_config()
  direct = jax.jit(pmf.make_example_losses(plain, model.apply))(net, x, labels, draws)
  d = jax.jit(lambda x_hat: perceptual.distances(frozen, config, draws.crop, x_hat, x))(
      direct["x_hat"])
  kept = np.asarray(draws.t) < 0.8
  assert kept.any() and not kept.all()
  expected = np.asarray(direct["loss"])
  for name, lambda_ in (("lpips", 0.4), ("convnext", 0.1)):
    masked = np.where(kept, np.asarray(d[name]), 0.0)
    assert np.all(masked[kept] > 0)
    np.testing.assert_allclose(metrics[name], masked.mean(), rtol=1e-4)
    expected = expected + lambda_ * masked / (masked + 0.01)
  np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)


# --- devices -----------------------------------------------------------------------------------

def _loss_and_grads(config, devices):
  """The objective's loss and gradients at perturbed initial weights on a batch of 64."""
  setup = train_state.setup(config, devices)
  rng = np.random.default_rng(0)
  net = jax.tree.map(lambda p: p + 0.05 * rng.normal(size=p.shape).astype(p.dtype),
                     jax.device_get(state.init_net(config)))
  params = {"net": jax.device_put(net, setup.state_shardings["params"]["net"])}
  sharding = parallel.batch_sharding(setup.mesh, config.mesh.rules)
  batch = {"image": jax.device_put(rng.normal(size=(64, 4, 4, 1)).astype(np.float32), sharding),
           "label": jax.device_put(np.arange(64) % CLASSES, sharding)}
  grad_fn = jax.jit(jax.value_and_grad(setup.objective.loss, has_aux=True))
  return jax.device_get(grad_fn(params, batch, jax.random.key(5)))


def test_loss_and_gradients_agree_on_one_device_and_on_a_three_axis_mesh():
  """data 2 x fsdp 2 x tensor 2: the draws, the split rows and the network all sharded."""
  config = pmf_config()
  config.training.batch_size = 64
  (loss, metrics), grads = _loss_and_grads(config, jax.devices()[:1])
  assert len(jax.devices()) == 8 and np.isfinite(loss)
  config.mesh.update({"data": 2, "fsdp": 2, "tensor": 2})
  (loss8, metrics8), grads8 = _loss_and_grads(config, jax.devices())
  np.testing.assert_allclose(loss8, loss, rtol=1e-5)
  for name in ("error_u", "error_v"):
    np.testing.assert_allclose(metrics8[name], metrics[name], rtol=1e-5)
  assert_trees_close(grads8["net"], grads["net"], rtol=1e-4, scale_atol=1e-3)


# --- config -------------------------------------------------------------------------------------

def test_config_validates_and_the_objective_builds():
  config = pmf_config()
  config_lib.validate(config)
  assert objectives.module(config) is pmf and pmf.describe(config).section == "pmf"
  config.sampling.guidance_scale = 8.5   # above 1 + s_max, as the official evaluation samples
  config_lib.validate(config)
  config.model.name = "imf_dit"
  with pytest.raises(ValueError, match="set model.name='pmf_dit'"):
    config_lib.validate(config)


@pytest.mark.parametrize("name, patch, noise, omega", [("pmf_in256", 16, 1.0, 8.5),
                                                      ("pmf_in512", 32, 2.0, 6.5)])
def test_imagenet_configs_validate_and_ask_for_the_feature_nets_files(name, patch, noise, omega):
  """The official recipe's settings; without the LPIPS / ConvNeXt files the check stops, naming
  the field (tiny random nets stand in here)."""
  import importlib
  config = importlib.import_module(f"configs.{name}").get_config()
  assert (config.model.patch_size, config.objective.noise_std) == (patch, noise)
  assert (config.sampling.guidance_scale, tuple(config.sampling.guidance_interval)) == (
      omega, (0.1, 0.7))
  assert pmf.perceptual_weights(config) == {"lpips": 0.4, "convnext": 0.1}
  with pytest.raises(ValueError, match="perceptual.lpips_vgg16=''"):
    config_lib.validate(config)
  config.perceptual.random_weights = "full"   # the recipe's nets, random: no file needed
  config_lib.validate(config)


@pytest.mark.parametrize("field, value, message", [
    ("model.t_floor", 0.0, r"model.t_floor"),
    ("objective.pmf.perceptual_max_t", 0.0, r"objective.pmf.perceptual_max_t"),
    ("objective.pmf.lpips_weight", -0.4, r"objective.pmf.lpips_weight"),
    ("objective.pmf.convnext_weight", -1.0, r"objective.pmf.convnext_weight"),
    ("objective.pmf.s_max", -1.0, r"objective.pmf.s_max"),
    ("objective.pmf.interval_split", 1.0, r"objective.pmf.interval_split"),
    ("objective.pmf.share_r_equals_t", 0.333, r"objective.pmf.share_r_equals_t=0.333.*fraction"),
    ("objective.pmf.aux_v_head", False, r"objective.pmf.aux_v_head"),
    ("sampling.guidance_scale", 0.5, r"sampling.guidance_scale=0.5.*objective.pmf.s_max"),
    ("sampling.guidance_interval", (0.6, 0.9), r"objective.pmf.interval_split"),
    ("objective.schedule", "cosine", r"objective.schedule='cosine'.*rectified_flow"),
])
def test_config_refusals(field, value, message):
  config = pmf_config()
  *sections, name = field.split(".")
  node = config
  for section in sections:
    node = node[section]
  if name in node:
    node[name] = value
  else:
    node.unlocked = True
    with node.unlocked():
      node[name] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)

"""Improved MeanFlow (kdiff_jax/objectives/imf.py): the draws, the cheaper step against the
official full-batch step, du/dt against a float64 finite difference, the config checks and the
sampler's guidance inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdiff_jax import config as config_lib, objectives, sampling, state
from kdiff_jax.objectives import imf, meanflow
from kdiff_jax.models import imf_dit
from tests.test_imf_dit import tiny_config

SHAPE = (8, 8, 1)


def imf_config():
  config = tiny_config()
  config.objective.imf.share_r_equals_t = 0.5
  config.objective.time_sampling = "logit_normal"
  config.objective.logit_normal_mean, config.objective.logit_normal_std = -0.4, 1.0
  config.sampling.guidance_scale = 3.0
  config.sampling.guidance_interval = (0.3, 0.7)
  return config


def _net(config, seed=0, std=0.1):
  """The config's network with perturbed parameters (zero-initialised parts become non-zero)."""
  model = state.build_model(config)
  net = nnx.to_pure_dict(nnx.state(imf_dit.imf_dit_from_config(
      config, jnp.float32, nnx.Rngs(seed)), nnx.Param))
  rng = np.random.default_rng(seed + 1)
  net = jax.tree.map(lambda p: p + std * rng.normal(size=p.shape).astype(np.float32), net)
  return model, net


def _draws(batch=8, seed=0):
  """Explicit draws: r = t on rows 0, 2, 4, 6 (share 1/2); a dropped r = t row (0) and a dropped
  r != t row (3); rows 1 and 5 outside their interval, 3 and 7 inside."""
  rng = np.random.default_rng(seed)
  equal = np.arange(batch) % 2 == 0
  t = np.array([0.5, 0.9, 0.3, 0.55, 0.8, 0.2, 0.6, 0.45])[:batch]
  r = np.where(equal, t, t - np.array([0, 0.3, 0, 0.4, 0, 0.1, 0, 0.2])[:batch])
  t_min = np.where(equal, 0.0, np.array([0, 0.1, 0, 0.2, 0, 0.3, 0, 0.4])[:batch])
  t_max = np.where(equal, 1.0, np.array([1, 0.6, 1, 0.9, 1, 0.7, 1, 0.8])[:batch])
  dropped = np.isin(np.arange(batch), [0, 3])
  labels = np.arange(batch) % 10
  omega = 1 + 7 * rng.uniform(size=batch)
  as32 = lambda a: jnp.asarray(a, jnp.float32)
  draws = imf.Draws(as32(t), as32(r), as32(rng.normal(size=(batch,) + SHAPE)),
                    jnp.asarray(np.where(dropped, 10, labels)), jnp.asarray(dropped),
                    as32(omega), as32(t_min), as32(t_max))
  x = as32(rng.normal(size=(batch,) + SHAPE))
  return x, jnp.asarray(labels), draws


# --- draws ------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [1.0, 2.0, 0.5])
def test_omega_follows_the_power_law(beta):
  """ω on [1, 1 + s_max] with CDF F(ω) = ∫_1^ω x^-β / ∫_1^(1+s_max) x^-β, by a KS distance."""
  s_max, n = 7.0, 20000
  omega = np.sort(np.asarray(imf.sample_omega(jax.random.key(0), n, s_max, beta), np.float64))
  assert omega.min() >= 1.0 and omega.max() <= 1.0 + s_max
  if beta == 1.0:
    cdf = np.log(omega) / np.log(1 + s_max)
  else:
    cdf = (omega ** (1 - beta) - 1) / ((1 + s_max) ** (1 - beta) - 1)
  ks = np.max(np.abs(cdf - np.arange(1, n + 1) / n))
  assert ks < 1.6 / np.sqrt(n)  # the 1% quantile of the KS statistic is ~1.63/sqrt(n)
  assert np.all(np.asarray(imf.sample_omega(jax.random.key(1), 8, 0.0, beta)) == 1.0)


def test_draws_lay_out_interval_and_rows():
  config = imf_config()
  config.objective.label_dropout = 0.3
  x = jnp.zeros((64,) + SHAPE)
  draws = imf.draw(jax.random.key(0), x, jnp.arange(64) % 10, config)
  equal = np.asarray(meanflow.r_equals_t_rows(64, 0.5))
  np.testing.assert_array_equal(np.asarray(draws.r == draws.t), equal)
  t_min, t_max = np.asarray(draws.t_min), np.asarray(draws.t_max)
  assert np.all(t_min[equal] == 0) and np.all(t_max[equal] == 1)
  assert np.all((t_min[~equal] >= 0) & (t_min[~equal] <= 0.5))
  assert np.all((t_max[~equal] >= 0.5) & (t_max[~equal] <= 1))
  assert len(np.unique(t_min[~equal])) == 32
  dropped = np.asarray(draws.dropped)
  np.testing.assert_array_equal(np.asarray(draws.labels)[dropped], 10)
  assert 0 < dropped.sum() and np.all(np.asarray(draws.omega) >= 1)


# --- the loss ---------------------------------------------------------------------------------

@pytest.mark.parametrize("aux_v_head", [True, False])
def test_cheaper_step_equals_the_official_full_batch_step(aux_v_head):
  """Same per-example losses, V, v_g and gradients; the draws include dropped rows with r = t
  and r != t, and rows inside and outside their guidance interval."""
  results = []
  for full in (True, False):
    config = imf_config()
    config.objective.imf.full_batch_jvp = full
    config.objective.imf.aux_v_head = aux_v_head
    model, net = _net(config)
    example_losses = imf.make_example_losses(config, model.apply)
    x, labels, draws = _draws()

    def total(net):
      losses = example_losses(net, x, labels, draws)
      return jnp.mean(losses["loss"]), losses

    (_, losses), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(net)
    results.append((losses, grads))
  (full, g_full), (cheap, g_cheap) = results
  for key in ("loss", "error_u", "error_v", "compound", "guided"):
    np.testing.assert_allclose(cheap[key], full[key], rtol=2e-5, atol=1e-6, err_msg=key)
  assert np.all(np.asarray(full["error_u"]) > 0)
  assert np.any(np.asarray(full["error_v"]) > 0) == aux_v_head
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_full), jax.tree.leaves(g_cheap)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.max(np.abs(a)) + 1e-9,
                               err_msg=jax.tree_util.keystr(path))


def test_guided_velocity_and_compound_against_direct_calls():
  """v_g and V row by row from separate network calls: v_c at (ω_w, y), v_u at (1, null), the
  JVP tangent v_c (not v_g), the main pass at the drawn ω and interval with the dropped label."""
  config = imf_config()
  config.objective.imf.full_batch_jvp = True
  model, net = _net(config)
  x, labels, d = _draws()
  losses = jax.jit(imf.make_example_losses(config, model.apply))(net, x, labels, d)
  z = (1 - d.t)[:, None, None, None] * x + d.t[:, None, None, None] * d.noise
  v = d.noise - x
  ones, zeros = jnp.ones(8), jnp.zeros(8)
  # Each direct call jitted once and called twice (compiles, not the math, cost the time here).
  v_head = jax.jit(lambda z, y, omega: model.apply(net, z, d.t, y, zeros, guidance=omega,
                                                   interval=(zeros, ones), v_head=True)[1])
  inside = (d.t >= d.t_min) & (d.t <= d.t_max)
  omega_w = jnp.where(inside, d.omega, 1.0)
  v_c, v_u = v_head(z, labels, omega_w), v_head(z, jnp.full((8,), 10), ones)
  v_g = v + (1 - 1 / omega_w)[:, None, None, None] * (v_c - v_u)
  v_g = jnp.where(d.dropped[:, None, None, None], v, v_g)
  np.testing.assert_allclose(losses["guided"], v_g, rtol=1e-5, atol=1e-6)
  assert np.asarray(inside).tolist() == [True, False, True, True, True, False, True, True]
  u_fn = lambda z_, t_, r_: model.apply(net, z_, t_, d.labels, t_ - r_, guidance=d.omega,
                                       interval=(d.t_min, d.t_max), v_head=True)[0]
  u_jvp = jax.jit(lambda tangent: jax.jvp(u_fn, (z, d.t, d.r), (tangent, ones, zeros)))
  u, du_dt = u_jvp(v_c)
  big_v = u + (d.t - d.r)[:, None, None, None] * du_dt
  np.testing.assert_allclose(losses["compound"], big_v, rtol=1e-5, atol=1e-6)
  # With v_g as the tangent (MeanFlow's choice) V differs on the r != t rows inside their
  # interval: the test tells the two apart.
  _, du_dt_g = u_jvp(v_g)
  assert float(jnp.max(jnp.abs(du_dt_g[3] - du_dt[3]))) > 1e-4
  error = lambda a, b: jnp.sum((a - b) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(losses["error_u"], error(big_v, v_g), rtol=1e-5)
  head = model.apply(net, z, d.t, d.labels, d.t - d.r, guidance=d.omega,
                     interval=(d.t_min, d.t_max), v_head=True)[1]
  np.testing.assert_allclose(losses["error_v"], error(head, v_g), rtol=1e-5)
  weight = lambda e: e / (e + 0.01)
  np.testing.assert_allclose(losses["loss"], weight(error(big_v, v_g)) + weight(error(head, v_g)),
                             rtol=1e-5)


def test_du_dt_matches_a_float64_finite_difference():
  """(V - u)/(t - r) = du/dt = d/dε u(z + ε·v_c, t + ε, r) at ε = 0, central differences in
  float64 on a float64 network."""
  with jax.enable_x64(True):
    config = imf_config()
    config.objective.imf.full_batch_jvp = True
    model = imf_dit.ImfDiT(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2,
                           num_heads=2, head_depth=1, num_classes=10, dtype=jnp.float64,
                           rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape), params))
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    apply_fn = lambda net, *args, **kwargs: nnx.merge(graphdef, net)(*args, **kwargs)
    x, labels, d = _draws()
    d = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, d)
    x = x.astype(jnp.float64)
    # jitted (one compile each) rather than op by op: the same float64 operations
    losses = jax.jit(imf.make_example_losses(config, apply_fn))(params, x, labels, d)
    assert losses["compound"].dtype == jnp.float64
    z = (1 - d.t)[:, None, None, None] * x + d.t[:, None, None, None] * d.noise
    inside = (d.t >= d.t_min) & (d.t <= d.t_max)
    omega_w = jnp.where(inside, d.omega, 1.0)
    v_c = apply_fn(params, z, d.t, labels, jnp.zeros(8), guidance=omega_w,
                   interval=(jnp.zeros(8), jnp.ones(8)), v_head=True, u_head=False)
    u_at = jax.jit(lambda eps: apply_fn(params, z + eps * v_c, d.t + eps, d.labels,
                                        d.t + eps - d.r, guidance=d.omega,
                                        interval=(d.t_min, d.t_max)))
    eps = 2e-3  # the embedders see h in float32: rounding ~3e-8/eps
    finite = (u_at(eps) - u_at(-eps)) / (2 * eps)
    u = u_at(0.0)
    assert u.dtype == jnp.float64
    unequal = np.asarray(d.t != d.r)
    du_dt = (losses["compound"] - u) / (d.t - d.r + ~unequal)[:, None, None, None]
    scale = float(jnp.max(jnp.abs(finite[unequal])))
    assert scale > 1e-2
    np.testing.assert_allclose(np.asarray(du_dt)[unequal], np.asarray(finite)[unequal],
                               atol=1e-4 * scale)


# --- config and sampling ----------------------------------------------------------------------

def test_config_validates_and_the_objective_builds():
  config = imf_config()
  config_lib.validate(config)
  objective = objectives.build(config, state.build_model(config).apply)
  assert objectives.module(config) is imf and objective.group_size == 2
  assert objective.description == imf.describe(config)
  loss, metrics = jax.jit(objective.loss)(
      {"net": _net(config)[1]}, {"image": jnp.zeros((4,) + SHAPE), "label": jnp.arange(4)},
      jax.random.key(0))
  assert np.isfinite(loss) and set(metrics) == {"loss", "error_u", "error_v"}


@pytest.mark.parametrize("field, value, message", [
    ("sampling.guidance_scale", 0.5, r"sampling.guidance_scale=0.5.*\[1, 8.0\]"),
    ("sampling.guidance_scale", 9.0, r"sampling.guidance_scale=9.0.*\[1, 8.0\]"),
    ("sampling.guidance_interval", (0.6, 0.9), r"sampling.guidance_interval=\(0.6, 0.9\).*t_min in \[0, 0.5\]"),
    ("sampling.guidance_interval", (0.1, 0.4), r"sampling.guidance_interval=\(0.1, 0.4\)"),
    ("objective.imf.interval_split", 1.0, r"objective.imf.interval_split"),
    ("objective.imf.s_max", -1.0, r"objective.imf.s_max"),
    ("objective.imf.share_r_equals_t", 0.333, r"objective.imf.share_r_equals_t=0.333.*fraction"),
    ("objective.name", "other", r"objective.name='other'.*'imf'"),
])
def test_config_refusals(field, value, message):
  config = imf_config()
  *sections, name = field.split(".")
  node = config
  for section in sections:
    node = node[section]
  node[name] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_imf_needs_the_imf_dit():
  config = imf_config()
  config.model.name, config.model.size, config.model.patch_size = "dit", "T", 2
  with pytest.raises(ValueError, match="set model.name='imf_dit'"):
    config_lib.validate(config)


@pytest.mark.parametrize("num_steps", [1, 2])
def test_sampler_feeds_guidance_and_interval_to_the_network(num_steps):
  """sampling.build's mean_flow on imf_dit: z <- z - (t - r)·u(z, h, ω, interval, y), with ω and
  the interval the sampling fields (one pass per step, no second guidance pass)."""
  config = imf_config()
  config.sampling.num_steps = num_steps
  model, net = _net(config)
  sample = sampling.build(config, imf.describe(config), model.apply)
  noise = jax.random.normal(jax.random.key(3), (4,) + SHAPE)
  labels = jnp.array([1, 4, 7, 9])
  got = jax.jit(sample)({"net": net}, noise, labels, jax.random.key(0))
  z = noise
  times = np.linspace(1.0, 0.0, num_steps + 1)
  for t, r in zip(times[:-1], times[1:]):
    tt, rr = jnp.full((4,), t, jnp.float32), jnp.full((4,), r, jnp.float32)
    u = model.apply(net, z, tt, labels, tt - rr, guidance=3.0, interval=(0.3, 0.7))
    z = z - jnp.float32(t - r) * u
  np.testing.assert_allclose(got, z, rtol=1e-5, atol=1e-5)
  unguided = model.apply(net, noise, jnp.ones(4), labels, jnp.full((4,), 1.0 / num_steps))
  assert float(jnp.max(jnp.abs(unguided - model.apply(
      net, noise, jnp.ones(4), labels, jnp.full((4,), 1.0 / num_steps), guidance=3.0,
      interval=(0.3, 0.7))))) > 1e-4


def test_in256_config_builds_xl_and_shards_every_large_parameter():
  """configs/imf_in256.py: iMF-XL/2 (711M with the v head), and on fsdp = 16, 64, 128 meshes no
  parameter of more than 1M elements stays replicated (abstract shapes only)."""
  import types
  from configs import imf_in256
  from kdiff_jax import parallel
  config = imf_in256.get_config()
  config.data.latents_path = "/nonexistent"  # validation does not read it
  config_lib.validate(config)
  model = state.build_model(config)
  assert model.num_params == 711_113_760
  rules = parallel.rules_dict(config.mesh.rules)
  for fsdp in (16, 64, 128):
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": fsdp, "tensor": 1})
    specs = jax.tree.map(
        lambda a, logical: types.SimpleNamespace(
            spec=parallel.logical_to_spec(logical, a.shape, mesh, rules)),
        model.abstract_net, model.logical_net,
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    largest = max((n for _, _, n in parallel.replicated_arrays(model.abstract_net, specs)),
                  default=0)
    assert largest <= 1_000_000, fsdp

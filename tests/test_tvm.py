"""TVM (objectives/tvm.py, samplers/tvm.py): draws against closed forms by quadrature, the loss
against a NumPy float64 implementation, the gradient through the JVP against finite differences,
the teacher EMA in the train state, 1 = 8 devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special, stats

from configs import default
from kdiff_jax import config as config_lib, data, parallel, sampling, train
from kdiff_jax.objectives import tvm
from kdiff_jax.samplers import tvm as tvm_sampler


def tvm_objective_config(**tvm_fields):
  config = default.get_config()
  config.objective.name = "tvm"
  for name, value in tvm_fields.items():
    config.objective.tvm[name] = value
  return config.objective


def tiny_tvm_config():
  """A tiny TVM DiT (TVM's options on) on synthetic 8x8x1 images, 4 classes."""
  config = default.get_config()
  config.data.name = "synthetic"
  config.data.image_size = 8
  config.data.channels = 1
  config.data.num_classes = 4
  config.model.size = "T"
  config.model.patch_size = 4
  config.model.second_time_embedder = True
  config.model.guidance_embedder = True
  config.model.norm = "rms_norm"
  config.model.qk_norm = True
  config.model.modulation_norm = True
  config.model.init = "spectral"
  config.model.time_scale = 1.0
  config.objective.name = "tvm"
  config.optimizer.learning_rate = 1e-3
  config.training.batch_size = 16
  config.training.num_steps = 4
  config.training.ema_decays = (0.9,)
  config.training.log_every = 2
  config.training.checkpoint_every = 2
  config.sampling.method = "tvm"
  config.sampling.num_steps = 2
  config.sampling.guidance_scale = 2.0
  config.sampling.grid_size = 2
  config.checkpoint.async_save = False
  return config


# --- draws ------------------------------------------------------------------------------------

def logit_normal_moment(mean, std, power, upper=np.inf):
  """E[sigmoid(Z)^power | Z <= upper], Z ~ N(mean, std), by quadrature."""
  f = lambda z: special.expit(z) ** power * stats.norm.pdf(z, mean, std)
  mass = stats.norm.cdf(upper, mean, std)
  return integrate.quad(f, -np.inf, upper)[0] / mass


def test_draws_truncate_s_below_one_minus_the_gap_and_match_closed_form_moments():
  cfg = tvm_objective_config()
  n = 200_000
  x = jnp.zeros((n, 1))
  draws = jax.jit(lambda key: tvm.sample_draws(key, x, jnp.zeros(n, jnp.int32), cfg, 10))(
      jax.random.key(0))
  gap, s, t, s_prime = (np.asarray(v, np.float64) for v in draws[:4])
  assert np.all(s <= 1.0 - gap) and np.all(s < t) and np.all(t <= 1.0) and np.all(s > 0)
  np.testing.assert_array_equal(t, np.minimum(np.float32(s) + np.float32(gap), 1.0))
  g = cfg.tvm
  # the gap and s': plain logit-normals
  for samples, (mean, std) in ((gap, (g.gap_mean, g.gap_std)), (s_prime, (g.s_mean, g.s_std))):
    for power in (1, 2):
      np.testing.assert_allclose(np.mean(samples**power), logit_normal_moment(mean, std, power),
                                 atol=3e-3)
  # s: the logit-normal conditioned on logit(s) <= logit(1 - l) = -logit(l), averaged over l
  nodes, weights = np.polynomial.hermite_e.hermegauss(60)
  weights = weights / weights.sum()
  for power in (1, 2):
    closed = sum(w * logit_normal_moment(g.s_mean, g.s_std, power, -(g.gap_mean + g.gap_std * z))
                 for z, w in zip(nodes, weights))
    np.testing.assert_allclose(np.mean(s**power), closed, atol=3e-3)
  # The standard normal's CDF in place of N(s_mean, s_std)'s would give another mean.
  wrong = np.mean(special.expit(g.s_mean + g.s_std * special.ndtri(
      np.random.default_rng(0).uniform(size=n) * special.ndtr(-special.logit(gap)))))
  assert abs(wrong - np.mean(s)) > 0.01


def test_beta_and_label_dropout():
  n = 20_000
  labels = jnp.arange(n, dtype=jnp.int32) % 10
  fixed = tvm.sample_draws(jax.random.key(1), jnp.zeros((n, 1)), labels, tvm_objective_config(),
                           10)
  dropped = np.asarray(fixed.labels) == 10
  assert abs(dropped.mean() - 0.1) < 0.01
  np.testing.assert_array_equal(np.asarray(fixed.labels)[~dropped], np.asarray(labels)[~dropped])
  np.testing.assert_allclose(np.asarray(fixed.beta), np.where(dropped, 1.0, 0.5))
  ranged = tvm.sample_draws(jax.random.key(2), jnp.zeros((n, 1)), labels,
                            tvm_objective_config(cfg_draw="range", min_cfg=1.5, max_cfg=3.0), 10)
  kept = np.asarray(ranged.labels) != 10
  cfg = 1.0 / np.asarray(ranged.beta)[kept]
  assert cfg.min() >= 1.5 - 1e-5 and cfg.max() <= 3.0 + 1e-5
  np.testing.assert_allclose(cfg.mean(), 2.25, atol=0.02)   # cfg ~ U[1.5, 3]
  uniform = tvm.sample_draws(jax.random.key(3), jnp.zeros((n, 1)), labels,
                             tvm_objective_config(cfg_draw="uniform"), 10)
  beta = np.asarray(uniform.beta)[np.asarray(uniform.labels) != 10]
  assert beta.min() > 0 and beta.max() <= 1 and abs(beta.mean() - 0.5) < 0.01


# --- the loss from fixed draws against NumPy float64 -------------------------------------------

def analytic_network(params, x, t, labels, h, guidance):
  """F = k·(sin(x)·(1 + t) + h^2·x·(labels + 1)/10 + guidance·cos(2x) + t·h), elementwise."""
  b = lambda v: v.reshape(v.shape + (1,) * (x.ndim - 1))
  return params["k"] * (jnp.sin(x) * (1 + b(t)) + b(h) ** 2 * x * b(labels + 1.0) / 10
                        + b(guidance) * jnp.cos(2 * x) + b(t * h))


def numpy_network(k, x, t, labels, h, guidance):
  b = lambda v: np.asarray(v, np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
  return k * (np.sin(x) * (1 + b(t)) + b(h) ** 2 * x * b(labels + 1.0) / 10
              + b(guidance) * np.cos(2 * x) + b(t) * b(h))


def numpy_loss(k_online, k_teacher, x, d, scale_output, null_label):
  """The per-example TVM loss in float64, dF/ds by central differences."""
  x = np.asarray(x, np.float64)
  s, t, sp, beta, e = (np.asarray(v, np.float64) for v in (d.s, d.t, d.s_prime, d.beta, d.noise))
  y = np.asarray(d.labels)
  b = lambda v: v.reshape((-1,) + (1,) * (x.ndim - 1))
  w = 1 / beta
  a = w if scale_output else np.ones_like(beta)
  y_t = b(1 - t) * x + b(t) * e
  y_sp = b(1 - sp) * x + b(sp) * e
  F = lambda s_: numpy_network(k_online, y_t, t, y, t - s_, beta)
  eps = 1e-6
  dF_ds = (F(s + eps) - F(s - eps)) / (2 * eps)
  f_st = y_t + b((s - t) * a) * F(s)
  df_ds = b(a) * (F(s) + b(s - t) * dF_ds)
  F_T = numpy_network(k_teacher, f_st, s, y, np.zeros_like(s), beta)
  F_T_uncond = numpy_network(k_teacher, y_sp, sp, np.full_like(y, null_label), np.zeros_like(s),
                             np.ones_like(beta))
  mean = lambda v: v.reshape(len(v), -1).mean(1)
  terminal = mean((b(beta) * (df_ds - b(a) * F_T)) ** 2)
  terminal = np.where(np.isclose(s, t, rtol=1e-5, atol=1e-8), 0.0, terminal)
  v = b(w) * (e - x) + b(1 - w) * F_T_uncond
  fm = mean((b(beta) * (b(a) * numpy_network(k_online, y_sp, sp, y, np.zeros_like(s), beta) - v))
            ** 2)
  return terminal + fm, terminal, fm


@pytest.mark.parametrize("scale_output", [True, False])
def test_loss_from_fixed_draws_matches_numpy_float64(scale_output):
  rng = np.random.default_rng(0)
  n = 6
  x = rng.normal(size=(n, 3, 2)).astype(np.float32)
  s = np.array([0.1, 0.3, 0.5, 0.05, 0.6, 0.4], np.float32)
  t = np.array([0.4, 0.9, 1.0, 0.2, 0.6, 0.8], np.float32)   # row 4: s = t by hand
  d = tvm.Draws(gap=t - s, s=s, t=t, s_prime=rng.uniform(0.05, 0.95, n).astype(np.float32),
                beta=np.array([0.5, 0.5, 1.0, 0.25, 0.5, 0.4], np.float32),
                noise=rng.normal(size=x.shape).astype(np.float32),
                labels=np.array([0, 1, 4, 2, 3, 1], np.int32))     # row 2: dropped (null 4, beta 1)
  got = tvm.per_example_losses(analytic_network, {"k": 0.7}, {"k": 0.5}, jnp.asarray(x), d,
                               scale_output=scale_output, null_label=4)
  want = numpy_loss(0.7, 0.5, x, d, scale_output, 4)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=2e-4, atol=1e-6)
  assert got[1][4] == 0 and want[2][4] > 0   # terminal zeroed where s = t, fm is not


# --- the gradient through the JVP ----------------------------------------------------------------

def mlp_network(params, x, t, labels, h, guidance):
  """A tiny dtype-agnostic network F(x, t, h, y, beta): one tanh layer over [x, t, h, beta, e_y]."""
  flat = x.reshape(x.shape[0], -1)
  features = jnp.concatenate([flat, t[:, None], h[:, None], guidance[:, None],
                              params["embed"][labels]], axis=1)
  hidden = jnp.tanh(features @ params["w1"] + params["b1"])
  return (hidden @ params["w2"]).reshape(x.shape)


def test_gradient_through_the_jvp_matches_float64_finite_differences():
  """Reverse over forward: the gradient of the loss, with df/ds from jax.jvp, equals central
  differences of the loss in float64 with the teacher's outputs held at their value (the teacher
  is a constant, its input f_{s,t} included); detaching the JVP would change it."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    n, dim, width = 8, 6, 16
    init = lambda *shape: jnp.asarray(rng.normal(size=shape) * 0.5, jnp.float64)
    params = {"w1": init(dim + 3 + 4, width), "b1": init(width), "w2": init(width, dim),
              "embed": init(5, 4)}
    teacher = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape)), params)
    x = jnp.asarray(rng.normal(size=(n, 3, 2)))
    s = jnp.asarray(rng.uniform(0.05, 0.5, n))
    t = s + jnp.asarray(rng.uniform(0.1, 0.5, n))
    d = tvm.Draws(gap=t - s, s=s, t=t, s_prime=jnp.asarray(rng.uniform(0.05, 0.95, n)),
                  beta=jnp.asarray([0.5] * 6 + [1.0, 0.25]), noise=jnp.asarray(rng.normal(size=x.shape)),
                  labels=jnp.asarray([0, 1, 2, 3, 0, 1, 4, 2], jnp.int32))
    recorded = {}

    def recording(p, x_, t_, y_, h_, guidance):
      out = mlp_network(p, x_, t_, y_, h_, guidance)
      if p is teacher:
        recorded["teacher"] = out
      return out

    loss = lambda p, net=mlp_network, teach=teacher, detach_jvp=False: jnp.mean(
        tvm.per_example_losses(net, p, teach, x, d, scale_output=True, null_label=4,
                               detach_jvp=detach_jvp)[0])
    loss(params, recording)   # the teacher's outputs at these weights, concrete
    fixed_net = lambda p, *args, **kw: (recorded["teacher"] if isinstance(p, str)
                                        else mlp_network(p, *args, **kw))
    gradient = jax.grad(loss)(params)
    detached = jax.grad(lambda p: loss(p, detach_jvp=True))(params)
    for seed in range(3):
      direction = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(seed).normal(
          size=p.shape)), params)
      along = lambda eps: loss(jax.tree.map(lambda p, v: p + eps * v, params, direction),
                               fixed_net, "fixed")
      finite = (along(1e-6) - along(-1e-6)) / 2e-6
      dot = lambda g: float(sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g),
                                                                 jax.tree.leaves(direction))))
      np.testing.assert_allclose(dot(gradient), float(finite), rtol=1e-6)
      assert abs(dot(detached) - float(finite)) > 1e-3 * abs(float(finite))


# --- the sampler ----------------------------------------------------------------------------------

@pytest.mark.parametrize("num_steps", [1, 2, 4])
@pytest.mark.parametrize("scale_output", [True, False])
def test_sampler_with_the_exact_velocity_lands_on_the_data(num_steps, scale_output):
  """For one data point x0, F = (x - x0)/(t·a) makes f_{s,t}(y_t) = y_s exactly: any grid ends at
  x0; the network sees h = t_i - t_{i+1} and beta = 1/cfg."""
  x0 = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2, 2, 1)), jnp.float32)
  cfg = 2.0
  a = cfg if scale_output else 1.0
  seen = []

  def network(x, t, h, labels, beta):
    seen.append((t, h, beta))
    return (x - x0) / (t[:, None, None, None] * a)

  times = np.linspace(1.0, 0.0, num_steps + 1)
  noise = jnp.asarray(np.random.default_rng(1).normal(size=x0.shape), jnp.float32)
  out = tvm_sampler.sample(network, noise, jnp.zeros(3, jnp.int32), times=times, cfg=cfg,
                           scale_output=scale_output)
  np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-5)
  (_, h, beta), = seen  # one traced step body (lax.scan)
  assert beta.shape == (3,)


def test_sampling_assembly_feeds_beta_and_the_stride():
  config = tiny_tvm_config()
  config.sampling.num_steps = 4
  config.sampling.guidance_scale = 4.0
  calls = []

  def apply_fn(net, x, t, labels, s=None, guidance=None):
    calls.append((np.asarray(t), np.asarray(s), np.asarray(guidance)))
    return jnp.zeros_like(x)

  sample = sampling.build(config, tvm.describe(config), apply_fn)
  noise = jnp.ones((2, 8, 8, 1))
  with jax.disable_jit():
    out = sample({"net": None}, noise, jnp.zeros(2, jnp.int32), None)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(noise))
  np.testing.assert_allclose([c[0][0] for c in calls], [1.0, 0.75, 0.5, 0.25])
  np.testing.assert_allclose([c[1][0] for c in calls], [0.25] * 4, rtol=1e-6)
  np.testing.assert_allclose([c[2][0] for c in calls], [0.25] * 4)


@pytest.mark.parametrize("fields, message", [
    ({"sampling.method": "heun"}, r"sampling.method='heun': objective.name='tvm' samples with one of \['tvm'\]"),
    ({"objective.name": "flow"}, r"sampling.method='tvm': objective.name='flow' samples with"),
    ({"model.guidance_embedder": False}, r"model.guidance_embedder=True"),
    ({"objective.schedule": "cosine"}, r"objective.schedule='cosine'"),
    ({"objective.tvm.cfg_draw": "sometimes"}, r"objective.tvm.cfg_draw='sometimes': must be one of"),
    ({"objective.tvm.teacher_decay": 1.0}, r"objective.tvm.teacher_decay=1.0: must be"),
    ({"objective.tvm.cfg_draw": "range", "objective.tvm.min_cfg": 3.0, "objective.tvm.max_cfg": 2.0},
     r"objective.tvm.min_cfg=3.0 must be <= objective.tvm.max_cfg=2.0"),
    ({"sampling.guidance_scale": 0.0}, r"sampling.guidance_scale=0.0"),
    ({"model.num_heads": 3}, r"model.num_heads=3 must divide"),
    ({"model.norm": "batch_norm"}, r"model.norm='batch_norm': must be one of"),
])
def test_bad_settings_stop_at_start_naming_the_field(fields, message):
  config = tiny_tvm_config()
  for path, value in fields.items():
    section, *rest = path.split(".")
    node = config[section]
    for part in rest[:-1]:
      node = node[part]
    node[rest[-1]] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


# --- the teacher in the train state, devices --------------------------------------------------

def test_teacher_is_an_ema_of_the_updated_weights_and_resumes_exactly(tmp_path):
  """The first step of train_and_evaluate (all devices) moves the teacher to 0.99·init +
  0.01·params, apart from the 0.9 evaluation EMA; 1 step + a resumed step equal 2 straight steps.
  The runs sample nothing (grids are not what is tested): one compiled step serves all three."""
  config = tiny_tvm_config()
  initial = jax.device_get(train.init_state(train.setup(config)))  # the runs' own init: seed 0
  for a, b in zip(jax.tree.leaves(initial["teacher"]), jax.tree.leaves(initial["params"])):
    np.testing.assert_array_equal(a, b)

  def run(num_steps, workdir):
    config = tiny_tvm_config()
    config.training.num_steps, config.training.checkpoint_every = num_steps, 1
    return jax.device_get(train.train_and_evaluate(config, str(tmp_path / workdir),
                                                   sampling_actions=lambda context: ()))

  straight = run(2, "straight")
  after = run(1, "resumed")
  assert int(after["step"]) == 1
  for old, new, params in zip(jax.tree.leaves(initial["teacher"]),
                              jax.tree.leaves(after["teacher"]),
                              jax.tree.leaves(after["params"])):
    assert np.all(np.isfinite(new))
    np.testing.assert_allclose(new, 0.99 * old + 0.01 * params, rtol=1e-6, atol=1e-7)
  # the online weights moved, and the evaluation EMA (0.9) is another tree
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after["params"]),
                                                      jax.tree.leaves(initial["params"])))
  assert any(not np.allclose(t, e) for t, e in zip(jax.tree.leaves(after["teacher"]),
                                                   jax.tree.leaves(after["ema"])))
  resumed = run(2, "resumed")
  assert set(resumed) == set(straight) and "teacher" in resumed
  for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(x, y)


def test_loss_and_gradients_agree_on_one_and_eight_devices():
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    config = tiny_tvm_config()
    setup = train.setup(config, devices)
    state = train.init_state(setup)
    iterator = data.build_iterator(config.data, global_batch_size=16, seed=0,
                                   sharding=parallel.batch_sharding(setup.mesh, config.mesh.rules))
    # a teacher apart from the online weights, so the terminal term is not trivially small
    teacher = jax.tree.map(lambda p: p * 0.9, state["params"])
    params = jax.tree.map(lambda p: p + 0.01, state["params"])
    grad_fn = jax.jit(jax.value_and_grad(setup.objective.loss, has_aux=True))
    (loss, metrics), grads = grad_fn(params, next(iterator), jax.random.key(3), teacher)
    results.append(jax.device_get((loss, metrics["terminal"], grads)))
  (loss_1, terminal_1, grads_1), (loss_8, terminal_8, grads_8) = results
  assert len(jax.devices()) == 8 and np.isfinite(loss_1) and terminal_1 > 0
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
  np.testing.assert_allclose(terminal_8, terminal_1, rtol=1e-5)
  # Gradients are sums over devices in another order: compare to 1e-3 of each array's scale and
  # 1e-6 of the largest gradient (the guidance embedder's, ~1e-7 from a near-constant beta, differ
  # by 0.3% of themselves).
  scale = max(np.max(np.abs(g)) for g in jax.tree.leaves(grads_1))
  for (path, g1), g8 in zip(jax.tree_util.tree_leaves_with_path(grads_1), jax.tree.leaves(grads_8)):
    np.testing.assert_allclose(g8, g1, rtol=1e-4, atol=1e-3 * np.max(np.abs(g1)) + 1e-6 * scale,
                               err_msg=jax.tree_util.keystr(path))


# --- export -------------------------------------------------------------------------------------

def test_torch_twin_with_tvm_options_loads_strictly_and_matches():
  torch = pytest.importorskip("torch")
  from flax import nnx
  from kdiff_jax.export import convert, torch_dit
  from kdiff_jax.models import dit
  options = dict(norm="rms_norm", qk_norm=True, modulation_norm=True)
  shape = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=2, num_heads=4,
               mlp_ratio=4.0, num_classes=10, second_time_embedder=True, time_scale=1.0)
  model = dit.DiT(**shape, **options, guidance_embedder=True, init="spectral", rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  params = nnx.state(model, nnx.Param)   # perturbed, so the zero-initialised layers act
  nnx.update(model, jax.tree.map(lambda p: p + jnp.asarray(0.05 * rng.normal(size=p.shape),
                                                           p.dtype), params))
  net = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  state_dict = convert.to_torch(net, model.pos_embed())
  module = torch_dit.DiT(**shape, **options, guidance_embedder=True)
  module.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  x = rng.normal(size=(3, 8, 8, 3)).astype(np.float32)
  t, h, beta = rng.uniform(size=(3, 3)).astype(np.float32)
  y = np.array([1, 7, 10])
  expected = np.asarray(model(jnp.asarray(x), t, y, h, guidance=beta))
  with torch.no_grad():
    got = module.eval()(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                        torch.from_numpy(y), torch.from_numpy(h),
                        guidance=torch.from_numpy(beta)).permute(0, 2, 3, 1).numpy()
  assert np.std(expected) > 0.1
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["spectral", "spectral_except_embedders"])
def test_spectral_init_leaves_the_embedders_at_normal_only_when_asked(init):
  """TVM's init_type='spectral' (lumalabs/tvm training/dit.py initialize_weights): each Linear and
  the patch conv (flattened to [fan_in, D]) has largest singular value 1; the time, stride and
  guidance embedders too with time_specinit, else normal(0.02); adaLN and the final linear zero."""
  from flax import nnx
  from kdiff_jax.models import dit
  model = dit.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                  num_heads=4, mlp_ratio=4.0, num_classes=10, second_time_embedder=True,
                  time_scale=1.0, norm="rms_norm", qk_norm=True, modulation_norm=True,
                  guidance_embedder=True, init=init, rngs=nnx.Rngs(0))
  net = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  top = lambda w: np.linalg.norm(np.asarray(w).reshape(-1, np.shape(w)[-1]), ord=2)
  for name in ("x_embedder", "blocks"):
    kernels = [net["x_embedder"]["proj"]["kernel"]] if name == "x_embedder" else [
        net["blocks"][0]["attn"]["qkv"]["kernel"], net["blocks"][1]["mlp"]["fc2"]["kernel"]]
    for kernel in kernels:
      np.testing.assert_allclose(top(kernel), 1.0, rtol=1e-5)
  for embedder in dit.EMBEDDERS:
    for layer in (0, 2):
      kernel = np.asarray(net[embedder]["mlp"][layer]["kernel"])
      if init == "spectral":
        np.testing.assert_allclose(top(kernel), 1.0, rtol=1e-5)
      else:
        assert 0.018 < kernel.std() < 0.022 and abs(top(kernel) - 1.0) > 0.3, (embedder, layer)
  assert not np.any(np.asarray(net["blocks"][0]["adaLN_modulation"][1]["kernel"]))
  assert not np.any(np.asarray(net["final_layer"]["linear"]["kernel"]))

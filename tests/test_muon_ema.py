"""Muon and EDM's half-life EMA: the optimizer's update against a float64 NumPy Muon / Adam, the
EMA's decay against its closed form (ramp-up included) and inside the step, 1 device = 8, an
exact resume, and sampling that reads the EMA of the half-life it is asked for."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import default
from kdiff_jax import checkpoint, config as config_lib, parallel, state as state_lib, train
from kdiff_jax import train_state
from tests.test_train import run_steps, tiny_config

pytestmark = pytest.mark.xdist_group("muon_ema")

ONE = jax.devices()[:1]
NS = (3.4445, -4.775, 2.0315)   # Newton-Schulz coefficients of Keller Jordan's Muon


def muon_config(**mesh):
  config = tiny_config(**mesh)
  config.optimizer.name = "muon"
  config.optimizer.weight_decay = 0.0
  config.training.ema_halflives_kimg = (0.001, 0.05)  # 1 and 50 images: the ramp adds 0.8 a step
  config.training.ema_decays = (0.9,)
  return config


def numpy_muon(grads_by_step, *, lr, beta, b1, b2, eps, matrix):
  """Float64 Muon (Nesterov momentum, Frobenius scaling, 5 quintic Newton-Schulz steps on the
  wide orientation, sqrt(max(1, fan_out/fan_in))) or Nesterov Adam for a non-matrix: the sum of
  the updates of the steps."""
  m = v = 0.0
  total = 0.0
  for t, g in enumerate(grads_by_step, start=1):
    g = np.asarray(g, np.float64)
    if matrix is not None:
      m = beta * m + (1 - beta) * g
      x = beta * m / (1 - beta**(t + 1)) + (1 - beta) * g / (1 - beta**t)
      blocks = x.reshape((-1,) + x.shape[-2:])
      out = []
      for block in blocks:
        wide = block.T if block.shape[0] > block.shape[1] else block
        wide = wide / (np.linalg.norm(wide) + eps)
        for _ in range(5):
          a = wide @ wide.T
          wide = NS[0] * wide + (NS[1] * a + NS[2] * a @ a) @ wide
        out.append(wide.T if block.shape[0] > block.shape[1] else wide)
      fan_in, fan_out = x.shape[-2:]
      update = np.stack(out).reshape(x.shape) * np.sqrt(max(1.0, fan_out / fan_in))
    else:
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      m_hat = b1 * m / (1 - b1**(t + 1)) + (1 - b1) * g / (1 - b1**t)
      update = m_hat / (np.sqrt(v / (1 - b2**t)) + eps)
    total = total - lr * update
  return total


def test_muon_update_matches_a_float64_numpy_muon_and_adam():
  """Two matrices (tall and wide), blocks stacked on a 'layers' axis (one matrix per block), a
  conv kernel, a bias, a scalar, and the in-context tokens and position table (2-D here, [1, n,
  width] in the official code: Adam's); three steps of random gradients."""
  shapes = {"tall": (6, 3), "wide": (3, 5), "stacked": (2, 4, 3), "conv": (1, 1, 2, 3),
            "bias": (4,), "scale": (), "class_tokens": (8, 3), "pos_embed": (5, 3)}
  logical = {"tall": P("embed", "mlp"), "wide": P(None, None), "stacked": P("layers", None, None),
             "conv": P(None, None, None, None), "bias": P(None), "scale": P(),
             "class_tokens": P(None, "embed"), "pos_embed": P(None, "embed")}
  rng = np.random.default_rng(0)
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)]
  opt = default.get_config().optimizer
  opt.name, opt.learning_rate, opt.b2 = "muon", 1e-3, 0.95
  matrices = train_state.muon_matrices(params, logical)
  assert sorted(k for k, d in matrices.items() if d is not None) == ["stacked", "tall", "wide"]
  optimizer = train_state.make_optimizer(opt, 10, matrices)
  state, new = optimizer.init(params), params
  for g in grads:
    updates, state = optimizer.update(g, state, new)
    new = jax.tree.map(lambda p, u: p + u, new, updates)
  for k in shapes:
    expected = numpy_muon([g[k] for g in grads], lr=1e-3, beta=0.95, b1=opt.b1, b2=0.95,
                          eps=opt.eps, matrix=matrices[k])
    np.testing.assert_allclose(np.asarray(new[k], np.float64) - params[k], expected, rtol=2e-3,
                               atol=2e-7, err_msg=k)


def test_ema_decay_is_edm_halflife_with_ramp_up():
  """beta = 0.5^(B / min(1000 H, 0.05 B n)) after n steps, against float64, at pMF's batch and
  half-lives (the ramp ends at n = 9765.6 for 500 kimg) and at the tiny runs' below."""
  for training in (muon_config().training, default.get_config().training):
    if not training.ema_halflives_kimg:
      training.batch_size, training.ema_halflives_kimg = 1024, (500, 2000)
    batch = training.batch_size
    steps = np.array([1, 2, 10, 100, 9765, 9766, 39062, 39063, 100_000])
    betas = jax.jit(lambda n, training=training: train_state.ema_betas(training, n))(steps)
    for h in training.ema_halflives_kimg:
      halflife = np.minimum(1000.0 * h, 0.05 * batch * steps.astype(np.float64))
      np.testing.assert_allclose(betas[checkpoint.halflife_key(h)], 0.5**(batch / halflife),
                                 rtol=1e-6)
    for d in training.ema_decays:
      assert betas[checkpoint.ema_key(d)] == d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same 4-step Muon run straight and as 2 steps, restore, 2 steps: (config, the two final
  states, the resumed run's workdir)."""
  root = tmp_path_factory.mktemp("muon_ema")
  straight = train.train_and_evaluate(muon_config(), str(root / "straight"), devices=ONE)
  first = muon_config()
  first.training.num_steps = 2
  train.train_and_evaluate(first, str(root / "resumed"), devices=ONE)
  resumed = train.train_and_evaluate(muon_config(), str(root / "resumed"), devices=ONE)
  return muon_config(), jax.device_get(straight), jax.device_get(resumed), str(root / "resumed")


def test_muon_and_halflife_emas_resume_exactly(runs):
  config, straight, resumed, _ = runs
  assert sorted(straight["ema"]) == ["0.001kimg", "0.05kimg", "0.9"]
  assert int(straight["step"]) == int(resumed["step"]) == 4
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_the_step_moves_each_ema_by_its_decay_and_one_device_equals_eight():
  """EMA_n = beta(n) EMA_{n-1} + (1 - beta(n)) params_n from EMA_0 = params_0, in float64, over
  the step's own params for 30 steps (the 50-image half-life ramps to 24 images: beta 0.63);
  the 1-device state after 2 steps against a data x fsdp mesh of 8."""
  expected, after_two = {}, {}

  def follow(n, state):
    """The float64 EMAs, moved by the closed-form beta toward the step's params."""
    params = jax.device_get(state["params"])
    for key in state["ema"]:
      beta = (0.9 if key == "0.9" else
              0.5**(16 / min(1000 * float(key[:-4]), 0.05 * 16 * n)))
      previous = expected.get(key, initial)
      expected[key] = jax.tree.map(lambda e, p: beta * e + (1 - beta) * p, previous, params)
    if n == 2:
      after_two.update(jax.device_get(state))

  setup = train_state.setup(muon_config(), ONE)
  initial = jax.tree.map(np.float64, jax.device_get(train_state.init_state(setup)["params"]))
  state, _ = run_steps(muon_config(), ONE, 30, on_step=follow)
  for key, tree in expected.items():
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(state["ema"][key]),
                            jax.tree.leaves(tree)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7,
                                 err_msg=key + jax.tree_util.keystr(path))
  many, _ = run_steps(muon_config(data=2, fsdp=4), jax.devices(), 2)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(after_two), jax.tree.leaves(many)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_muon_state_is_sharded_like_the_params():
  setup = train_state.setup(muon_config(data=2, fsdp=4), jax.devices())
  params = {jax.tree_util.keystr(p): s for p, s in
            jax.tree_util.tree_leaves_with_path(setup.state_shardings["params"])}
  moments = 0
  for path, sharding in jax.tree_util.tree_leaves_with_path(setup.state_shardings["opt_state"]):
    name = jax.tree_util.keystr(path)
    if "['net']" in name:
      assert sharding == params[name[name.index("['net']"):]], name
      moments += "fsdp" in str(sharding.spec)
    else:
      assert sharding.is_fully_replicated, name
  assert moments > 0


def test_sampling_reads_the_ema_of_the_half_life_asked_for(runs):
  config, _, resumed, workdir = runs
  weights = state_lib.Weights(config, parallel.make_mesh(config.mesh, ONE))
  for asked, key in ((0.0, "0.001kimg"), (0.05, "0.05kimg")):
    config.sampling.ema_halflife_kimg = asked
    params, step = weights.restore(workdir, use_ema=True)
    assert step == 4
    for x, y in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(resumed["ema"][key])):
      np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(train_state.sampling_params(resumed, config)),
                    jax.tree.leaves(resumed["ema"][key])):
      np.testing.assert_array_equal(x, y)
  first, second = (jax.tree.leaves(resumed["ema"][k]) for k in ("0.001kimg", "0.05kimg"))
  assert not all(np.array_equal(x, y) for x, y in zip(first, second))


@pytest.mark.parametrize("fields, message", [
    (dict(sampling__ema_halflife_kimg=1.0),
     r"sampling.ema_halflife_kimg=1.0: the run keeps the EMAs of "
     r"training.ema_halflives_kimg=\(0.001, 0.05\)"),
    (dict(optimizer__name="sgd"), r"optimizer.name='sgd': must be one of \['adamw', 'muon'\]"),
    (dict(optimizer__weight_decay=0.01),
     r"optimizer.weight_decay=0.01: optimizer.name='muon' takes 0"),
    (dict(training__ema_halflives_kimg=(500, 0)),
     r"training.ema_halflives_kimg=\(500, 0\): must be"),
    (dict(training__ema_halflives_kimg=(500, 500)),
     r"training.ema_halflives_kimg=\(500, 500\): each half-life once"),
])
def test_bad_values_are_refused_naming_the_field(fields, message):
  config = muon_config()
  for name, value in fields.items():
    section, field = name.split("__")
    config[section][field] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)

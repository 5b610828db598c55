"""The trainer: sharding invariance, exact resume, cross-topology restore, fail-fast config."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from kdiff_jax import actions, checkpoint, state, train, train_state

# pytest-xdist runs the tests that share this module's fixtures on one worker.
pytestmark = pytest.mark.xdist_group("train")


def tiny_config(**mesh):
  config = default.get_config()
  config.data.name = "synthetic"
  config.data.image_size = 8
  config.data.channels = 2
  config.data.num_classes = 4
  config.model.size = "T"
  config.model.patch_size = 2
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.01
  config.optimizer.grad_clip_norm = 1.0
  config.training.batch_size = 16
  config.training.num_steps = 4
  config.training.ema_decays = (0.9, 0.5)
  config.training.log_every = 2
  config.training.checkpoint_every = 2
  config.sampling.num_steps = 2
  config.sampling.grid_size = 2
  config.checkpoint.async_save = False
  for axis, size in mesh.items():
    config.mesh[axis] = size
  return config


def run_steps(config, devices, num_steps, on_step=None):
  """(final state, losses) of num_steps steps; on_step(n, state) after step n when given."""
  setup = train_state.setup(config, devices)
  state = train_state.init_state(setup)
  train_step = train_state.make_train_step(setup)
  from kdiff_jax import data, parallel
  batches = data.build_iterator(config.data, global_batch_size=config.training.batch_size,
                                sharding=parallel.batch_sharding(setup.mesh, config.mesh.rules),
                                seed=config.seed)
  losses = []
  for n in range(1, num_steps + 1):
    state, metrics = train_step(state, next(batches))
    losses.append(float(metrics["loss"]))
    if on_step is not None:
      on_step(n, state)
  return jax.device_get(state), losses


def assert_trees_close(a, b, rtol, atol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def one_device_run():
  """The reference every mesh is compared with: 3 steps on a single device."""
  return run_steps(tiny_config(data=1, fsdp=1, tensor=1), jax.devices()[:1], 3)


@pytest.mark.parametrize("mesh", [dict(data=8, fsdp=1), dict(data=2, fsdp=4), dict(data=1, fsdp=4, tensor=2)],
                         ids=["data8", "data2_fsdp4", "fsdp4_tensor2"])
def test_one_device_and_eight_devices_agree(one_device_run, mesh):
  one, losses_one = one_device_run
  many, losses_many = run_steps(tiny_config(**mesh), jax.devices(), 3)
  np.testing.assert_allclose(losses_many, losses_one, rtol=1e-5)
  assert_trees_close(many["params"], one["params"], rtol=1e-4, atol=1e-6)
  assert losses_one[0] != losses_one[2]  # the steps did train


def test_fsdp_actually_shards_parameters():
  setup = train_state.setup(tiny_config(data=2, fsdp=4), jax.devices())
  specs = [sharding.spec for sharding in jax.tree.leaves(setup.state_shardings["params"])]
  assert any("fsdp" in str(spec) for spec in specs)


def test_compute_weights_cast_what_the_network_casts_and_nothing_else():
  """state.compute_weights: the weights that the train step casts once to the compute dtype are
  exactly those the network would cast on every call, so its output does not change."""
  config = tiny_config()
  config.model.compute_dtype = "bfloat16"
  config.model.second_time_embedder = True   # float32 time embedders next to bf16 blocks
  model = state.build_model(config)
  net = jax.jit(lambda: state.init_net(config))()
  net = jax.tree.map(lambda p: p + 0.05 * np.random.default_rng(0).normal(size=p.shape)
                     .astype(np.float32), net)   # non-zero adaLN gates and final layer
  cast = model.compute_weights(net)
  dtypes = {jax.tree_util.keystr(k): v.dtype for k, v in jax.tree_util.tree_leaves_with_path(cast)}
  assert {str(d) for d in dtypes.values()} == {"bfloat16", "float32"}, dtypes
  rng = np.random.default_rng(1)
  inputs = (rng.normal(size=(4, 8, 8, 2)).astype(np.float32), rng.uniform(size=4).astype(np.float32),
            np.arange(4), rng.uniform(size=4).astype(np.float32))
  out = np.asarray(model.apply(net, *inputs))
  np.testing.assert_array_equal(np.asarray(model.apply(cast, *inputs)), out)
  # Rounding every weight (the time embedders and norms compute in float32) does change it.
  everything = jax.tree.map(lambda p: p.astype(jnp.bfloat16), net)
  assert not np.array_equal(np.asarray(model.apply(everything, *inputs)), out)
  # In float32 there is nothing to cast.
  float32 = tiny_config()
  float32.model.second_time_embedder = True
  assert state.build_model(float32).compute_weights(net) is net


def test_resume_continues_exactly(tmp_path):
  straight = train.train_and_evaluate(tiny_config(), str(tmp_path / "straight"))
  config = tiny_config()
  config.training.num_steps = 2
  train.train_and_evaluate(config, str(tmp_path / "resumed"))
  resumed = train.train_and_evaluate(tiny_config(), str(tmp_path / "resumed"))
  assert int(resumed["step"]) == int(straight["step"]) == 4
  for x, y in zip(jax.tree.leaves(jax.device_get(straight)), jax.tree.leaves(jax.device_get(resumed))):
    np.testing.assert_array_equal(x, y)
  assert (tmp_path / "resumed" / "samples").is_dir()


def test_fsdp_checkpoint_restores_on_one_device(tmp_path):
  config = tiny_config(data=1, fsdp=8)
  config.training.num_steps = 2
  saved = jax.device_get(train.train_and_evaluate(config, str(tmp_path)))
  setup = train_state.setup(tiny_config(data=1, fsdp=1), jax.devices()[:1])
  mngr = checkpoint.manager(str(tmp_path), config.checkpoint)
  restored, position = checkpoint.restore(mngr, setup.abstract_state)
  assert position == 2 and mngr.latest_step() == 2
  assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(restored))
  for x, y in zip(jax.tree.leaves(saved), jax.tree.leaves(jax.device_get(restored))):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("field, value, message", [
    ("model.size", "XXL", r"model.size='XXL': must be one of .*'XL'"),
    ("optimizer.learning_rate", -1e-4, r"optimizer.learning_rate=-0.0001: must be a finite number > 0"),
    ("training.batch_size", 12, r"training.batch_size=12 must be divisible by the 8 batch shards"),
    ("objective.schedule", "edm", r"objective.schedule='edm'.*rectified_flow"),
])
def test_bad_config_fails_before_compilation(tmp_path, monkeypatch, field, value, message):
  def no_compile(*args, **kwargs):
    raise AssertionError("compiled before validating")
  monkeypatch.setattr(train, "init_state", no_compile)
  monkeypatch.setattr(train, "make_train_step", no_compile)
  config = tiny_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path))


def test_unknown_field_is_named(tmp_path):
  config = tiny_config()
  config.training.nums_steps = 3
  with pytest.raises(ValueError, match=r"unknown config field 'training.nums_steps'.*training.num_steps"):
    train.train_and_evaluate(config, str(tmp_path))


def poison(monkeypatch, bad_position):
  """Make the batch that brings the data position to `bad_position` all NaN."""
  from kdiff_jax import data
  build = data.build_iterator

  def poisoned(*args, **kwargs):
    it = build(*args, **kwargs)

    class Poisoned:
      position = property(lambda self: it.position)

      def __next__(self):
        batch = next(it)
        if it.position == bad_position:
          batch = dict(batch, image=batch["image"] * np.nan)
        return batch
    return Poisoned()

  monkeypatch.setattr(data, "build_iterator", poisoned)


def test_non_finite_loss_stops_with_the_step(tmp_path, monkeypatch):
  poison(monkeypatch, 3)
  config = tiny_config()
  config.training.log_every = 100
  config.training.checkpoint_every = 100
  with pytest.raises(actions.NonFiniteLossError, match="at step 3"):
    train.train_and_evaluate(config, str(tmp_path))


def test_the_loop_without_the_callers_fid_action_refuses_eval_fid_every(tmp_path):
  """The in-loop FID needs Inception, which the loop never imports: a caller that hands no FID
  action (main.py hands evaluate.training_actions) is refused at start, before anything exists."""
  config = tiny_config()
  config.eval.fid_every = 2
  with pytest.raises(ValueError, match=r"eval.fid_every=2: the in-loop FID is built by the caller"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()

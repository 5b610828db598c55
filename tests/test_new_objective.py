"""A method is one module: an objective defined entirely here — its config section, check, draws,
loss and description with its own sampler and PyTorch sampler — registered through the public
registries (objectives.register, torch_sampling.register) trains with train.train_and_evaluate,
samples with sampling.build and exports, with no edit to the package.

The toy method is flow matching with a scaled output: x_t = (1 - t)·x + t·n, the network's
output F is read as the velocity v = scale·F, loss = mean((scale·F(x_t, t, y) - (n - x))²), and
its sampler is Euler in t on v: x <- x + (s - t)·scale·F(x, t, y). The tests compare it with the
same steps written out against the network, in JAX and in PyTorch."""
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kdiff_jax import config as config_lib, objectives, parallel, sampling, state, train
from kdiff_jax.export import checkpoints
from kdiff_jax.rules import number
from tests.test_train import tiny_config

ONE = jax.devices()[:1]


# --- the method, as a new module would hold it ---------------------------------------------------

class ScaledEuler:
  """The trained network as a velocity v = scale·F(x_t, t, y); sampled by Euler in t."""

  methods = ("scaled_euler",)
  torch_sampler = "scaled_euler"

  def __init__(self, scale):
    self.scale = scale

  def check_sampling(self, config):
    if config.sampling.guidance_scale != 1.0:
      raise ValueError(f"sampling.guidance_scale={config.sampling.guidance_scale}: the toy "
                       "method has no guidance: set 1.0")

  def time_grid(self, config):
    chosen = config.sampling
    return np.linspace(chosen.t_start, chosen.t_end, chosen.num_steps + 1)

  def plan(self, config):
    return self.time_grid(config)

  def sampler(self, config, apply_fn):
    times = self.time_grid(config)

    def sample(params, noise, labels, key):
      del key
      x = noise
      for t, s in zip(times[:-1], times[1:]):
        velocity = self.scale * apply_fn(params["net"], x, jnp.full((x.shape[0],), t), labels)
        x = x + (s - t) * velocity.astype(jnp.float32)
      return x
    return sample

  def export(self, config, params_by_weights):
    del config, params_by_weights
    return {"toy": {"scale": self.scale}}


def toy_method():
  """The module: defaults, RULES, check, describe, build (objectives' registry docstring)."""
  def defaults():
    return ml_collections.ConfigDict(dict(scale=2.0))

  def check(config):
    if config.objective.schedule != "rectified_flow":
      raise ValueError(f"objective.schedule={config.objective.schedule!r}: the toy method is "
                       "on rectified flow: set 'rectified_flow'")

  def describe(config):
    return ScaledEuler(config.objective.toy.scale)

  def draw(rng, x):
    """t ~ U[0, 1] per row, n ~ N(0, I)."""
    rng_t, rng_n = jax.random.split(rng)
    return jax.random.uniform(rng_t, (x.shape[0],)), jax.random.normal(rng_n, x.shape)

  def build(config, apply_fn):
    scale = config.objective.toy.scale

    def loss(params, batch, rng):
      x = batch["image"]
      t, n = draw(rng, x)
      x_t = (1 - t)[:, None, None, None] * x + t[:, None, None, None] * n
      output = apply_fn(params["net"], x_t, t, batch["label"]).astype(jnp.float32)
      value = jnp.mean(jnp.square(scale * output - (n - x)))
      return value, {"loss": value}
    return dict(loss=loss, description=describe(config))

  return types.SimpleNamespace(defaults=defaults, RULES={"scale": number(0, low_open=True)},
                               check=check, describe=describe, build=build)


def torch_scaled_euler(model, meta, noise, labels, *, method, times, guidance_scale, weights):
  """The PyTorch twin of ScaledEuler.sampler (torch_sampling's sampler signature)."""
  import torch
  del method, guidance_scale, weights
  scale, x = meta["objective"]["toy"]["scale"], noise.float()
  with torch.no_grad():
    for t, s in zip(times[:-1], times[1:]):
      t_vector = torch.full((x.shape[0],), t, dtype=torch.float32)
      x = x + np.float32(s - t) * scale * model(x, t_vector, labels)
  return x


# --- registered from outside, for this module's tests only ---------------------------------------

@pytest.fixture(scope="module")
def registered():
  """objectives.register('toy', ...) on copies of the registries, restored afterwards."""
  patch = pytest.MonkeyPatch()
  patch.setattr(objectives, "MODULES", dict(objectives.MODULES))
  patch.setattr(objectives, "RULES", dict(objectives.RULES))
  objectives.register("toy", toy_method())
  yield
  patch.undo()


def toy_config():
  config = tiny_config()   # a DiT-T on synthetic 8x8x2 data, 4 classes
  config.objective.name = "toy"
  config.objective.toy.scale = 2.0
  config.sampling.method = "scaled_euler"
  config.sampling.num_steps = 3
  config.training.num_steps = 2
  config.training.ema_decays = (0.5,)
  return config


@pytest.fixture(scope="module")
def trained(registered, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("toy"))
  config = toy_config()
  final = train.train_and_evaluate(config, workdir, devices=ONE)
  assert int(final["step"]) == 2
  return config, workdir


def test_the_config_section_and_rules_come_with_the_registration(registered):
  config = toy_config()
  config_lib.validate(config)
  config.objective.toy.scale = 0.0
  with pytest.raises(ValueError, match=r"objective.toy.scale=0.0: must be a finite number > 0"):
    config_lib.validate(config)
  config = toy_config()
  config.sampling.method = "heun"
  with pytest.raises(ValueError, match=r"sampling.method='heun'.*\['scaled_euler'\]"):
    config_lib.validate(config)
  config = toy_config()
  config.objective.name = "toys"
  with pytest.raises(ValueError, match=r"objective.name='toys': must be one of \[.*'toy'\]"):
    config_lib.validate(config)


def test_register_refuses_an_incomplete_method_or_a_taken_name(registered):
  incomplete = types.SimpleNamespace(RULES={}, check=None, describe=None)
  with pytest.raises(ValueError, match=r"register\('mine', ...\): the method lacks \['build'\]"):
    objectives.register("mine", incomplete)
  with pytest.raises(ValueError, match=r"register\('imf', ...\): 'imf' is registered already"):
    objectives.register("imf", toy_method())


def _restored(config, workdir):
  weights = state.Weights(config, parallel.make_mesh(config.mesh, ONE))
  params, step = weights.restore(workdir, use_ema=True)
  return weights, params, step


def test_trains_and_samples_by_its_own_method(trained):
  config, workdir = trained
  weights, params, step = _restored(config, workdir)
  assert step == 2
  sample = jax.jit(sampling.build(config, weights.objective.description, weights.model.apply))
  noise = jax.random.normal(jax.random.key(1), (4, 8, 8, 2))
  labels = jnp.arange(4)
  got = sample(params, noise, labels, jax.random.key(0))
  x = noise   # the same Euler steps, written against the network
  for t, s in ((1.0, 2 / 3), (2 / 3, 1 / 3), (1 / 3, 0.0)):
    x = x + (s - t) * 2.0 * weights.model.apply(params["net"], x, jnp.full((4,), t), labels)
  np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(got - noise))) > 0.1


def test_exports_and_samples_in_torch_by_its_registered_sampler(trained, monkeypatch):
  torch_load = pytest.importorskip("kdiff_jax.export.torch_load")
  from kdiff_jax.export import torch_sampling
  import torch
  config, workdir = trained
  paths = checkpoints.export_checkpoint(config, workdir)
  model, meta = torch_load.load(paths["json"])
  assert meta["objective"]["toy"] == {"scale": 2.0}
  assert meta["objective"]["torch_sampler"] == "scaled_euler"
  assert meta["sampling"]["times"] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
  noise = np.array(jax.random.normal(jax.random.key(1), (4, 8, 8, 2)))
  labels = np.arange(4)
  with pytest.raises(ValueError, match=r"objective 'toy': no PyTorch sampler named "
                                       r"'scaled_euler' is registered"):
    torch_sampling.sample(model, meta, torch.from_numpy(noise).permute(0, 3, 1, 2),
                          torch.from_numpy(labels))
  monkeypatch.setattr(torch_sampling, "SAMPLERS", dict(torch_sampling.SAMPLERS))
  torch_sampling.register("scaled_euler", torch_scaled_euler)
  got = torch_sampling.sample(model, meta, torch.from_numpy(noise).permute(0, 3, 1, 2),
                              torch.from_numpy(labels)).permute(0, 2, 3, 1).numpy()
  weights, params, _ = _restored(config, workdir)
  sample = jax.jit(sampling.build(config, weights.objective.description, weights.model.apply))
  expected = np.asarray(sample(params, noise, labels, jax.random.key(0)))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  del meta["objective"]["torch_sampler"]
  with pytest.raises(ValueError, match=r"objective 'toy': no PyTorch sampler samples it"):
    torch_sampling.sample(model, meta, torch.from_numpy(noise).permute(0, 3, 1, 2),
                          torch.from_numpy(labels))

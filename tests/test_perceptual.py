"""The perceptual feature nets (kdiff_jax/perceptual.py) against their PyTorch packages, on random
weights written in the files' own layouts: LPIPS-VGG16 against `lpips.LPIPS(net='vgg')` (0.1.4)
loaded with the same torchvision-layout VGG16 state_dict and linear-heads file, ConvNeXt V2
against transformers' ConvNextV2ForImageClassification from a save_pretrained folder; the paired
crop against PIL's bicubic resize of the same box; the missing-file error; and a run whose
objective uses frozen nets resumes exactly without them in its checkpoints."""
import os
import shutil
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kdiff_jax import checkpoint, config as config_lib, objectives, perceptual, train
from kdiff_jax.rules import number
from tests.test_new_objective import toy_method

torch = pytest.importorskip("torch")
ONE = jax.devices()[:1]


def reference_packages():
  """(lpips, transformers), imported for the tests only (torchvision, which both import, imports
  with conftest.py's stub)."""
  lpips = pytest.importorskip("lpips")
  transformers = pytest.importorskip("transformers")
  return lpips, transformers


def _random(shape, rng, scale):
  return torch.from_numpy(rng.normal(0, scale, shape).astype(np.float32))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Random weights in the files' layouts: torchvision's VGG16 state_dict (features.N.*; its
  classifier keys too, shrunk, which LPIPS does not read), the lpips heads file
  (lin{l}.model.1.weight) and a save_pretrained ConvNeXt V2 of a small config."""
  _, transformers = reference_packages()
  root, rng = tmp_path_factory.mktemp("perceptual"), np.random.default_rng(0)
  vgg, index, channels = {}, 0, 3
  for stage, widths in enumerate(perceptual.lpips_lib.VGG16_WIDTHS):
    index += stage > 0
    for width in widths:
      vgg[f"features.{index}.weight"] = _random((width, channels, 3, 3), rng,
                                                np.sqrt(2 / (9 * channels)))
      vgg[f"features.{index}.bias"] = _random((width,), rng, 0.1)
      index, channels = index + 2, width
  for layer in (0, 3, 6):
    vgg[f"classifier.{layer}.weight"] = _random((4, 4), rng, 1.0)
    vgg[f"classifier.{layer}.bias"] = _random((4,), rng, 1.0)
  torch.save(vgg, root / "vgg16.pth")
  heads = {f"lin{tap}.model.1.weight": _random((1, widths[-1], 1, 1), rng, 1.0).abs()
           for tap, widths in enumerate(perceptual.lpips_lib.VGG16_WIDTHS)}
  torch.save(heads, root / "lpips_vgg.pth")
  torch.manual_seed(0)
  config = transformers.ConvNextV2Config(hidden_sizes=[8, 16, 16, 24], depths=[1, 2, 1, 1],
                                         num_labels=5)
  model = transformers.ConvNextV2ForImageClassification(config).eval()
  with torch.no_grad():   # GRN and the norms start at 0 / 1: randomise every parameter
    for parameter in model.parameters():
      parameter.add_(torch.randn_like(parameter) * 0.2)
  model.save_pretrained(root / "convnext")
  return dict(lpips_vgg16=str(root / "vgg16.pth"), lpips_heads=str(root / "lpips_vgg.pth"),
              convnext=str(root / "convnext"))


@pytest.fixture(scope="module")
def registered():
  """A toy objective with perceptual weights in its section (as pMF's), registered on copies of
  the registries: the flow loss plus λ·mean distance of x̂ = x_t − t·v̂ to x."""
  patch = pytest.MonkeyPatch()
  patch.setattr(objectives, "MODULES", dict(objectives.MODULES))
  patch.setattr(objectives, "RULES", dict(objectives.RULES))
  method = toy_method()
  plain_build = method.build

  def defaults():
    return ml_collections.ConfigDict(dict(scale=1.0, lpips_weight=0.5, convnext_weight=0.1))

  def build(config, apply_fn):
    built = plain_build(config, apply_fn)
    lam = perceptual.weights(config)

    def loss(params, batch, rng, frozen):
      value, metrics = built["loss"](params, batch, rng)
      x = batch["image"]
      t = jax.random.uniform(jax.random.fold_in(rng, 1), (x.shape[0],))
      noise = jax.random.normal(jax.random.fold_in(rng, 2), x.shape)
      x_t = (1 - t)[:, None, None, None] * x + t[:, None, None, None] * noise
      v = apply_fn(params["net"], x_t, t, batch["label"]).astype(jnp.float32)
      x_hat = x_t - t[:, None, None, None] * v
      rgb = lambda image: jnp.concatenate([image, image[..., :1]], -1)   # 2 channels -> 3
      d = perceptual.distances(frozen, config, jax.random.fold_in(rng, 3), rgb(x_hat), rgb(x))
      value = value + sum(lam[net] * jnp.mean(d[net]) for net in perceptual.NETS)
      return value, dict(metrics, loss=value)

    return dict(built, loss=loss, frozen=perceptual.loader(config))

  method = types.SimpleNamespace(**dict(vars(method), defaults=defaults, build=build,
                                        RULES={"scale": number(0, low_open=True),
                                               "lpips_weight": number(0),
                                               "convnext_weight": number(0)}))
  objectives.register("toy", method)
  yield
  patch.undo()


def _perceptual_config(files=None):
  from tests.test_new_objective import toy_config
  config = toy_config()
  config.objective.toy.scale = 1.0
  config.perceptual.crop_size = 32
  config.perceptual.random_weights = "tiny" if files is None else "none"
  for field, path in (files or {}).items():
    config.perceptual[field] = path
  return config


@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")   # lpips' own call
def test_lpips_matches_the_lpips_package(files, registered):
  lpips, _ = reference_packages()
  config = _perceptual_config(files)
  config.objective.toy.convnext_weight = 0.0
  frozen = perceptual.load(config)
  assert set(frozen) == {"lpips"}
  reference = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True,
                          model_path=files["lpips_heads"], verbose=False).eval()
  vgg = torch.load(files["lpips_vgg16"], weights_only=True)
  slices = {0: 1, 4: 2, 9: 3, 16: 4, 23: 5}   # the first feature index of each lpips slice
  start = lambda index: max(s for s in slices if s <= index)
  reference.net.load_state_dict({
      f"slice{slices[start(int(key.split('.')[1]))]}.{key.split('.', 1)[1]}": value
      for key, value in vgg.items() if key.startswith("features.")})
  rng = np.random.default_rng(1)
  x_hat, x = (rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32) for _ in range(2))
  net = perceptual.nnx.merge(perceptual._graphdef(config, "lpips"), frozen["lpips"])
  got = np.asarray(net(x_hat, x))
  with torch.no_grad():
    expected = reference(torch.from_numpy(x_hat).permute(0, 3, 1, 2),
                         torch.from_numpy(x).permute(0, 3, 1, 2)).reshape(-1).numpy()
  print("lpips", got, expected, np.max(np.abs(got - expected)))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("output", ["pooled", "logits"])
def test_convnext_matches_transformers(files, registered, output):
  _, transformers = reference_packages()
  config = _perceptual_config(files)
  config.perceptual.convnext_output = output
  if output == "logits":   # the bare .safetensors, its config.json beside it
    config.perceptual.convnext = os.path.join(files["convnext"], "model.safetensors")
  config.objective.toy.lpips_weight = 0.0
  frozen = perceptual.load(config)
  model = transformers.ConvNextV2ForImageClassification.from_pretrained(files["convnext"]).eval()
  x = np.random.default_rng(2).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  net = perceptual.nnx.merge(perceptual._graphdef(config, "convnext"), frozen["convnext"])
  got = np.asarray((net.pooled if output == "pooled" else net)(x))
  with torch.no_grad():
    pixels = torch.from_numpy(x).permute(0, 3, 1, 2)
    expected = (model.convnextv2(pixels).pooler_output if output == "pooled"
                else model(pixels).logits).numpy()
  print("convnext", output, np.max(np.abs(got - expected)))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_paired_crop_is_one_box_resampled_as_pil_does():
  from PIL import Image
  rng = np.random.default_rng(3)
  a, b = (rng.uniform(-1, 1, (3, 20, 24, 2)).astype(np.float32) for _ in range(2))
  key, size = jax.random.key(4), 16
  crops_a, crops_b = perceptual.paired_random_resized_crop(key, a, b, size)
  boxes = np.asarray(perceptual.crop_boxes(key, 3, 20, 24))
  for i, (top, left, height, width) in enumerate(boxes.T):
    assert 1 <= height <= 20 and 1 <= width <= 24 and top + height <= 20 and left + width <= 24
    assert 0.08 * 480 - 50 <= height * width <= 480
    for image, crops in ((a, crops_a), (b, crops_b)):
      expected = np.stack([np.asarray(Image.fromarray(image[i, :, :, c], mode="F").resize(
          (size, size), Image.Resampling.BICUBIC, box=(left, top, left + width, top + height)))
          for c in range(2)], -1)
      np.testing.assert_allclose(crops[i], expected, atol=2e-5)


def test_a_missing_file_stops_the_config_check(registered, tmp_path):
  config = _perceptual_config(dict(lpips_vgg16="", lpips_heads="", convnext=""))
  with pytest.raises(ValueError, match=r"perceptual.lpips_vgg16='': not set; "
                                       r"objective.toy.lpips_weight=0.5 needs torchvision's "
                                       r".*vgg16-397923af.pth"):
    config_lib.validate(config)
  config.objective.toy.lpips_weight = 0.0
  config.perceptual.convnext = str(tmp_path)
  with pytest.raises(ValueError, match=r"perceptual.convnext=.*config.json' does not exist.*"
                                       r"facebook/convnextv2-base-22k-224"):
    config_lib.validate(config)
  config.objective.toy.convnext_weight = 0.0   # no net in use: no file needed
  config_lib.validate(config)


def test_frozen_weights_follow_the_compute_dtype(registered):
  config = _perceptual_config()
  rng = np.random.default_rng(5)
  x_hat, x = (rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32) for _ in range(2))
  got = {}
  for dtype in ("float32", "bfloat16"):
    config.model.compute_dtype = dtype
    frozen = perceptual.load(config)
    assert {leaf.dtype.name for leaf in jax.tree.leaves(frozen)} == {dtype}
    got[dtype] = jax.jit(lambda f, a, b: perceptual.distances(f, config, jax.random.key(0), a, b))(
        frozen, x_hat, x)
  for net in perceptual.NETS:
    assert np.all(np.asarray(got["float32"][net]) > 0)
    np.testing.assert_allclose(got["bfloat16"][net], got["float32"][net], rtol=0.1)
  config.objective.toy.lpips_weight = config.objective.toy.convnext_weight = 0.0
  assert perceptual.loader(config) is None   # no net in use: nothing loaded or handed over


def _convnext_v2_parameters(hidden_sizes, depths, num_labels, channels=3, patch=4):
  """ConvNeXt V2's parameter count from its architecture (arXiv 2301.00808, transformers'
  ConvNextV2ForImageClassification): stem conv + LayerNorm; per block a 7x7 depthwise conv,
  LayerNorm, d -> 4d -> d linears with GRN (γ, β of 4d) between; per later stage a LayerNorm and
  a 2x2 stride-2 conv; the final LayerNorm and the classifier."""
  total = channels * hidden_sizes[0] * patch * patch + hidden_sizes[0] + 2 * hidden_sizes[0]
  for stage, (width, depth) in enumerate(zip(hidden_sizes, depths)):
    if stage:
      before = hidden_sizes[stage - 1]
      total += 2 * before + 4 * before * width + width
    total += depth * (49 * width + width + 2 * width + 4 * width * width + 4 * width
                      + 8 * width + 4 * width * width + width)
  return total + 2 * hidden_sizes[-1] + hidden_sizes[-1] * num_labels + num_labels


def test_full_random_weights_are_the_recipe_nets_without_files(registered):
  """random_weights='full' needs no file and has the recipe's sizes: VGG16's 13 conv layers
  (14,714,688 parameters, torchvision's features) + LPIPS' five 1x1 heads (64+128+256+512+512,
  no bias), ConvNeXt-V2-base (88.7M, the paper's 89M) by the count from its architecture; shapes
  only (nothing drawn). 'tiny' loads exactly what `abstract` says."""
  config = _perceptual_config()
  config.perceptual.random_weights = "full"
  config_lib.validate(config)
  shapes = perceptual.abstract(config)
  count = {net: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
           for net, tree in shapes.items()}
  assert count["lpips"] == 14_714_688 + 64 + 128 + 256 + 512 + 512
  base = _convnext_v2_parameters((128, 256, 512, 1024), (3, 3, 27, 3), 1000)
  assert count["convnext"] == base and 88_000_000 < base < 89_000_000
  config.perceptual.random_weights = "tiny"
  assert (jax.tree.map(lambda x: (x.shape, x.dtype), perceptual.abstract(config))
          == jax.tree.map(lambda x: (x.shape, x.dtype), perceptual.load(config)))
  config.perceptual.random_weights = "yes"
  with pytest.raises(ValueError, match="perceptual.random_weights"):
    config_lib.validate(config)


def test_a_run_with_frozen_nets_resumes_exactly_without_them_in_its_checkpoints(
    registered, tmp_path, capsys):
  """4 steps straight (checkpoints at 2 and 4) = the same run resumed from its step 2."""
  config = _perceptual_config()
  config.training.num_steps = 4
  config.training.checkpoint_every = 2
  config.checkpoint.async_save = False
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"), devices=ONE)
  workdir = str(tmp_path / "resumed")
  shutil.copytree(tmp_path / "straight", workdir)
  shutil.rmtree(os.path.join(checkpoint.directory(workdir), "4"))
  capsys.readouterr()
  resumed = train.train_and_evaluate(config, workdir, devices=ONE)
  assert "resumed from step 2; 2 steps to go" in capsys.readouterr().out
  assert set(resumed) == {"step", "params", "opt_state", "ema", "rng"}
  assert int(resumed["step"]) == 4
  for got, expected in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  saved = [name for _, directories, names in os.walk(checkpoint.directory(workdir))
           for name in directories + names]
  assert not [name for name in saved if "frozen" in name or "lpips" in name or "convnext" in name]
  # The frozen weights are arguments of the step (what aot.py lowers), not constants in it, and
  # the lowered and compiled step still run as step(state, batch) (benchmarks/step_time.py).
  run = train.setup(config, ONE)
  batch = {"image": jax.ShapeDtypeStruct((16, 8, 8, 2), jnp.float32),
           "label": jax.ShapeDtypeStruct((16,), jnp.int32)}
  lowered = train.make_train_step(run).lower(run.abstract_state, batch)
  assert lowered.in_tree.num_leaves == (len(jax.tree.leaves(run.abstract_state)) + 2
                                        + len(jax.tree.leaves(run.abstract_frozen)))
  state, metrics = lowered.compile()(resumed, {"image": jnp.zeros((16, 8, 8, 2)),
                                               "label": jnp.zeros((16,), jnp.int32)})
  assert int(state["step"]) == 5 and np.isfinite(float(metrics["loss"]))

"""Sample metrics: the Flax InceptionV3 against a torch FID Inception, FID / IS / precision-recall
against closed forms and brute force, and FID-n of the digits demo on 8 devices."""
import os

import jax
import numpy as np
import pytest

from kdiff_jax import evaluate, images
from kdiff_jax.export import weight_files

# pytest-xdist runs the tests that share the digits demo on one worker.
pytestmark = pytest.mark.xdist_group("digits_fm")

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
  """(torch FID InceptionV3 with random weights, its .pth path, the .npz conversion path)."""
  from tests import torch_fid_inception
  torch.manual_seed(0)
  model = torch_fid_inception.FIDInceptionV3().eval()
  torch_fid_inception.randomize(model, seed=0)
  directory = tmp_path_factory.mktemp("inception")
  pth, npz = str(directory / "random_inception.pth"), str(directory / "random_inception.npz")
  torch.save(model.state_dict(), pth)
  weight_files.inception_npz(pth, npz)
  return model, pth, npz


def test_flax_inception_matches_the_torch_fid_inception(random_inception):
  from flax import nnx
  model, pth, npz = random_inception
  rng = np.random.default_rng(0)
  batch = rng.integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)  # resized to 299 x 299
  with torch.no_grad():
    features_ref, logits_ref = model(torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255)
  graphdef, params = weight_files.inception(pth)
  features, logits = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, batch)
  feature_error = np.abs(np.asarray(features) - features_ref.numpy()).max()
  logit_error = np.abs(np.asarray(logits) - logits_ref.numpy()).max()
  print(f"max |flax - torch|: features {feature_error:.2e} (max |feature| "
        f"{features_ref.abs().max():.2f}), logits {logit_error:.2e}")
  assert features.shape == (2, 2048) and logits.shape == (2, 1008)
  assert feature_error <= 1e-4 and logit_error <= 1e-4
  assert features_ref.std() > 0.1  # the random weights keep the features informative

  _, from_npz = weight_files.inception(npz)  # the torch-free format holds the same tensors
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(from_npz)):
    np.testing.assert_array_equal(a, b)


def test_frechet_distance_matches_closed_forms():
  rng = np.random.default_rng(0)
  dim = 6
  rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
  a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
  sigma1, sigma2 = rotation @ np.diag(a) @ rotation.T, rotation @ np.diag(b) @ rotation.T
  # Commuting covariances: |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert evaluate.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-10)

  # 2x2, non-commuting: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2.
  s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
  s2 = np.array([[0.5, -0.2], [-0.2, 3.0]])
  product = s1 @ s2
  trace_sqrt = np.sqrt(np.trace(product) + 2 * np.sqrt(np.linalg.det(product)))
  expected = 1.0 + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
  assert evaluate.frechet_distance([1, 0], s1, [0, 0], s2) == pytest.approx(expected, rel=1e-10)

  # Feature sets drawn from two Gaussians: the estimate converges to the closed form above.
  x = rng.multivariate_normal(mu1, sigma1, 200_000)
  y = rng.multivariate_normal(mu2, sigma2, 200_000)
  closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  estimate = evaluate.frechet_distance(*evaluate.statistics(x), *evaluate.statistics(y))
  print(f"FID of Gaussian feature sets {estimate:.4f} vs closed form {closed:.4f}")
  assert estimate == pytest.approx(closed, rel=0.02)
  # A set against its own statistics; rank-deficient (N < D) covariances included.
  for features in (x[:5000], rng.normal(size=(50, 128))):
    assert abs(evaluate.frechet_distance(*evaluate.statistics(features),
                                         *evaluate.statistics(features))) < 1e-6


def test_inception_score_closed_forms():
  classes = 16
  confident = np.full((64, 1008), -1e4)
  confident[np.arange(64), np.arange(64) % classes] = 0.0  # one-hot over 16 classes, balanced
  assert evaluate.inception_score(confident, num_splits=4) == pytest.approx(classes, rel=1e-6)
  same = np.tile(np.random.default_rng(0).normal(size=(1, 1008)), (40, 1))
  assert evaluate.inception_score(same) == pytest.approx(1.0, abs=1e-9)


def test_precision_recall_match_brute_force():
  from scipy.spatial import cKDTree
  rng = np.random.default_rng(0)
  real = rng.normal(size=(700, 8)).astype(np.float32)
  fake = (1.3 * rng.normal(size=(500, 8)) + 0.4).astype(np.float32)

  def covered(queries, points):
    radii = cKDTree(points).query(points, k=evaluate.K_NEAREST + 1)[0][:, -1]
    distances = np.linalg.norm(queries[:, None].astype(np.float64) - points[None], axis=-1)
    return np.mean(np.any(distances <= radii[None], axis=1))

  precision, recall = evaluate.precision_recall(real, fake)
  print(f"precision {precision:.4f} recall {recall:.4f}")
  assert precision == pytest.approx(covered(fake, real), abs=2e-3)  # float32 vs float64 ties
  assert recall == pytest.approx(covered(real, fake), abs=2e-3)
  assert 0.2 < precision < 0.95 and 0.2 < recall < 0.99
  assert evaluate.precision_recall(real, real) == (1.0, 1.0)


def test_fid_action_on_the_digits_demo_across_8_devices(digits_fm_run, random_inception,
                                                         tmp_path):
  """FID-n of the trained demo, as the trainer's periodic action runs it (8 devices), with
  random Inception weights (or the real ones when $KDIFF_INCEPTION_PATH names the file)."""
  from kdiff_jax import parallel, sampling, state
  config, workdir = digits_fm_run
  config = config.copy_and_resolve_references()
  real_weights = os.environ.get("KDIFF_INCEPTION_PATH", "")
  config.eval.inception_path = real_weights if os.path.isfile(real_weights) else random_inception[2]
  config.eval.fid_num_samples = 12          # 2 batches of 8 (one per device), the second half used
  config.eval.batch_size = 8
  config.eval.reference_num_examples = 12
  config.sampling.num_steps = 4
  mesh = parallel.make_mesh(config.mesh)
  assert mesh.size == 8
  weights = state.Weights(config, mesh)
  params, _ = weights.restore(workdir, use_ema=True)
  sample = sampling.build(config, weights.objective.description, weights.model.apply)
  fid = evaluate.FidAction(config, mesh, sample)
  metrics = fid(params)
  value = metrics["fid_12"]
  print(f"digits demo: FID-12 {value:.2f}, IS {metrics['inception_score_12']:.3f}")
  assert np.isfinite(value) and value > 0

  # Sampling sharded over the batch against the trainer's replicated sample function (batch 0,
  # same key): the same images, hence features, in the same row order after the gather.
  features, _ = fid.evaluator.sample_features(params, 8)
  key = jax.random.fold_in(jax.random.key(config.sampling.seed), 0)
  samples = sampling.make_sampler(config, sample, mesh, sampling.cycling_labels(8, range(10)))(
      params, key)
  expected, _ = fid.evaluator.features(8, lambda b: images.to_uint8(np.asarray(samples)))
  np.testing.assert_allclose(features, expected, atol=1e-4)

  # Noise images are much further from the digits than the trained model's samples.
  noise = images.to_uint8(np.random.default_rng(0).uniform(-1, 1, (16, 8, 8, 1)))
  noise_features, _ = fid.evaluator.features(12, lambda b: noise[b * 8:(b + 1) * 8])
  noise_fid = evaluate.frechet_distance(*evaluate.statistics(noise_features),
                                        fid.reference["mu"], fid.reference["sigma"])
  print(f"noise images: FID-12 {noise_fid:.2f}")
  assert noise_fid > 1.2 * value  # deterministic: 15.9 vs 10.9 here


def test_eval_mode_with_an_adm_reference_batch(digits_fm_run, random_inception, tmp_path):
  """evaluate.evaluate (main.py --mode=eval) on the demo checkpoint against an ADM-format
  reference batch holding only images (arr_0): FID, IS, precision and recall in a .json."""
  import json
  import shutil
  from kdiff_jax.data import builtin
  config, workdir = digits_fm_run
  config = config.copy_and_resolve_references()
  digits, _ = builtin.digits_arrays(8)
  np.savez(tmp_path / "reference.npz", arr_0=images.to_uint8(digits[:12]))  # 2 batches
  config.eval.update(inception_path=random_inception[2], reference_path=str(tmp_path / "reference.npz"),
                     num_samples=8, batch_size=8)
  config.sampling.num_steps = 4
  shutil.copytree(os.path.join(workdir, "checkpoints"), tmp_path / "checkpoints")
  results = evaluate.evaluate(config, str(tmp_path))
  print("eval:", results)
  with open(tmp_path / "eval_step1500_heun_4steps_w2_n8.json") as f:
    assert json.load(f) == results
  assert results["num_samples"] == 8 and np.isfinite(results["fid"]) and results["fid"] > 0
  assert 0.0 < results["precision"] <= 1.0 and 0.0 < results["recall"] <= 1.0
  assert 1.0 <= results["inception_score"] < 1008

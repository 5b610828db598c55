"""The k-Diff digits demo, measured: learned k against D/(D+d), and sample accuracy.

Trains configs/kdiff_digits.py (or, with --frozen, the same run with k fixed at 1/2, i.e.
v-prediction) on scikit-learn's 8x8 digits, then prints
* the learned k (raw and EMA; sampling uses the EMA one),
* D/(D+d) for D = 64 pixels and estimates of the digits' intrinsic dimension d: PCA (the
  number of components holding 90 / 95 / 99% of the variance) and the Levina-Bickel (2004)
  maximum-likelihood estimate from 10 and 20 nearest neighbours,
* the fraction of 500 class-conditional samples that a logistic regression trained on the
  real digits labels with their class (tests/test_demo.py's `conditional_accuracy`).

  python benchmarks/kdiff_digits.py [--frozen] [--workdir /tmp/kdiff_digits]
"""
import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.neighbors import NearestNeighbors  # noqa: E402

from configs import kdiff_digits  # noqa: E402
from kdiff_jax import train  # noqa: E402
from kdiff_jax.objectives import kdiff  # noqa: E402
from test_demo import conditional_accuracy  # noqa: E402


def pca_dimension(images, fraction):
  """Fewest principal components holding `fraction` of the variance."""
  centred = images - images.mean(0)
  variance = np.linalg.svd(centred, compute_uv=False) ** 2
  return int(np.searchsorted(np.cumsum(variance) / variance.sum(), fraction) + 1)


def mle_dimension(images, neighbours):
  """Levina & Bickel (2004): mean over points of 1 / mean_j log(T_k / T_j), j < k."""
  distances, _ = NearestNeighbors(n_neighbors=neighbours + 1).fit(images).kneighbors(images)
  distances = distances[:, 1:]
  ratios = np.log(distances[:, -1:] / distances[:, :-1])
  with np.errstate(divide="ignore"):
    estimates = 1.0 / ratios.mean(axis=1)
  return float(np.mean(estimates[np.isfinite(estimates)]))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--frozen", action="store_true", help="k fixed at 1/2 (v-prediction)")
  parser.add_argument("--workdir", default="")
  args = parser.parse_args()
  workdir = args.workdir or tempfile.mkdtemp(prefix="kdiff_digits_")
  config = kdiff_digits.get_config()
  if args.frozen:
    config.objective.kdiff.learnable = False

  start = time.time()
  state = train.train_and_evaluate(config, workdir)
  trained = time.time() - start
  kd = config.objective.kdiff
  k_raw = float(kdiff.k_of(state["params"], None, kd))
  k_ema = float(kdiff.k_of(train.sampling_params(state, config), None, kd))
  start = time.time()
  accuracy = conditional_accuracy(config, workdir)
  sampled = time.time() - start

  digits = load_digits().images.reshape(-1, 64) / 8.0 - 1.0
  ambient = digits.shape[1]
  print(f"workdir {workdir}: {config.training.num_steps} steps in {trained:.0f}s, "
        f"500 samples + classifier in {sampled:.0f}s")
  print(f"learned k: {k_raw:.3f} (EMA {k_ema:.3f})   conditional accuracy: {accuracy:.3f}")
  print(f"{'estimate of d':>22} {'d':>6} {'D/(D+d)':>8}")
  for fraction in (0.90, 0.95, 0.99):
    d = pca_dimension(digits, fraction)
    print(f"{f'PCA {fraction:.0%} variance':>22} {d:>6} {ambient / (ambient + d):>8.3f}")
  for neighbours in (10, 20):
    d = mle_dimension(digits, neighbours)
    print(f"{f'MLE, {neighbours} neighbours':>22} {d:>6.1f} {ambient / (ambient + d):>8.3f}")


if __name__ == "__main__":
  main()

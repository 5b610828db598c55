"""Sample-quality statistics shared by the benchmarks (benchmarks/imm_toy.py, few_step.py,
pmf_targets.py)."""
import numpy as np
from sklearn.datasets import load_digits


def energy_distance(x, y):
  """The energy distance's V-statistic (Szekely & Rizzo 2004), in float64, between point sets
  x [n, d] and y [m, d]:  ED(X, Y) = 2·mean|X - Y| - mean|X - X'| - mean|Y - Y'|."""
  mean_distance = lambda a, b: np.mean(np.sqrt(np.sum(np.square(a[:, None] - b[None]), -1)))
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return 2.0 * mean_distance(x, y) - mean_distance(x, x) - mean_distance(y, y)


def real_digits():
  """Per class c: (reference, held_out), the even- and odd-numbered real digits of class c
  (pixels x/8 - 1, the training data's scale)."""
  digits = load_digits()
  x = digits.images.reshape(len(digits.images), -1) / 8.0 - 1.0
  return {c: (x[digits.target == c][0::2], x[digits.target == c][1::2]) for c in range(10)}


def class_energy_distance(images, labels, real):
  """Mean over classes of ED(samples of class c, the reference real digits of class c)."""
  return float(np.mean([energy_distance(images[labels == c], real[c][0]) for c in real]))

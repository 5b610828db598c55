"""Sample-quality statistics shared by the benchmarks (benchmarks/imm_toy.py, few_step.py)."""
import numpy as np


def energy_distance(x, y):
  """The energy distance's V-statistic (Szekely & Rizzo 2004), in float64, between point sets
  x [n, d] and y [m, d]:  ED(X, Y) = 2·mean|X - Y| - mean|X - X'| - mean|Y - Y'|."""
  mean_distance = lambda a, b: np.mean(np.sqrt(np.sum(np.square(a[:, None] - b[None]), -1)))
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return 2.0 * mean_distance(x, y) - mean_distance(x, x) - mean_distance(y, y)

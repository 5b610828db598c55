"""Built-in in-memory sources: sklearn digits, synthetic images, a low-dimensional subspace of
image space, 2-D toy distributions.

All of them, and `latents.py`, are *indexed* sources: global batch b of size B is a pure
function of (seed, b), and a process only materialises the rows it holds. Examples come from
one endless stream of positions p = b·B + row:

* dataset sources (digits, latents) read example `stream_indices(p)`: epoch e = p // N is a
  permutation of [0, N) drawn by `np.random.default_rng((seed, e))`;
* per-example randomness (flips, synthetic images, posterior noise) is a function of
  (seed, purpose, p) only, so the global batch is the same for any number of processes and a
  resumed stream is identical to the uninterrupted one.

Each source has `element_shape` (shape of one 'image') and
`batch(batch_index, rows, global_batch_size) -> dict(image=float32 [len(rows), ...],
label=int32 [len(rows)])`.
"""
import functools

import numpy as np

from kdiff_jax import images as images_lib

# Purposes, so that independent random streams never share draws.
FLIP = 1
SYNTHETIC = 2
LATENT_NOISE = 3
TOY = 4
SUBSPACE = 5

TOY_NAMES = ("8gaussians", "moons", "checkerboard")


# --- the global stream -------------------------------------------------------------------

def positions(batch_index: int, rows: np.ndarray, global_batch_size: int) -> np.ndarray:
  """Stream positions p = b·B + row of the given rows of global batch b (int64)."""
  return np.int64(batch_index) * np.int64(global_batch_size) + np.asarray(rows, np.int64)


def _seed_int(seed) -> int:
  return int(seed) % (1 << 63)


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of epoch `epoch`: a permutation of [0, N) from default_rng((seed, epoch))."""
  permutation = np.random.default_rng((_seed_int(seed), int(epoch))).permutation(num_examples)
  permutation.flags.writeable = False
  return permutation


def stream_indices(stream_positions: np.ndarray, num_examples: int, seed: int) -> np.ndarray:
  """Dataset index read at each stream position: permutation_{p // N}[p % N]."""
  stream_positions = np.asarray(stream_positions, np.int64)
  epochs, offsets = np.divmod(stream_positions, num_examples)
  indices = np.empty_like(stream_positions)
  for epoch in np.unique(epochs):
    mask = epochs == epoch
    indices[mask] = epoch_permutation(seed, int(epoch), num_examples)[offsets[mask]]
  return indices


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64 finaliser (Steele et al. 2014): a bijective 64-bit mixer; wraps mod 2^64."""
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def position_bits(seed: int, purpose: int, stream_positions: np.ndarray) -> np.ndarray:
  """64 pseudo-random bits per stream position, a pure function of (seed, purpose, p)."""
  key = _splitmix64(np.array([_seed_int(seed)], np.uint64))
  key = _splitmix64(key ^ np.uint64(purpose))
  return _splitmix64(key ^ np.asarray(stream_positions, np.int64).astype(np.uint64))


def flip_mask(seed: int, stream_positions: np.ndarray) -> np.ndarray:
  """Bernoulli(1/2) horizontal-flip decisions, one per stream position."""
  return (position_bits(seed, FLIP, stream_positions) >> np.uint64(63)).astype(bool)


def example_rng(seed: int, purpose: int, position: int) -> np.random.Generator:
  """A generator owned by one stream position (for per-example arrays)."""
  return np.random.default_rng((_seed_int(seed), purpose, int(position)))


def apply_flips(images: np.ndarray, flips: np.ndarray) -> np.ndarray:
  """Mirror images[i] along the width axis (axis 2 of NHWC) where flips[i]."""
  return np.where(flips[:, None, None, None], images[:, :, ::-1, :], images)


# --- digits ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def digits_arrays(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """All 1797 sklearn digits as ([N, S, S, 1] float32 in [-1, 1], [N] int32 labels 0..9).

  Pixels 0..16 map to x/8 - 1; S != 8 resizes bilinearly (images.bilinear_matrix).
  """
  from sklearn.datasets import load_digits  # bundled with scikit-learn, never downloads
  digits = load_digits()
  images = digits.images.astype(np.float64) / 8.0 - 1.0  # [N, 8, 8]
  if image_size != 8:
    matrix = images_lib.bilinear_matrix(8, image_size)
    images = np.einsum("hi,nij,wj->nhw", matrix, images, matrix)
  images = np.clip(images, -1.0, 1.0).astype(np.float32)[..., None]
  images.flags.writeable = False
  labels = digits.target.astype(np.int32)
  labels.flags.writeable = False
  return images, labels


class DigitsSource:
  """sklearn's 8×8 digits as an endless stream of per-epoch permutations."""

  def __init__(self, *, image_size: int, seed: int, random_flip: bool):
    self.images, self.labels = digits_arrays(image_size)
    self.seed = seed
    self.random_flip = random_flip
    self.element_shape = self.images.shape[1:]

  def batch(self, batch_index: int, rows: np.ndarray, global_batch_size: int) -> dict:
    stream_positions = positions(batch_index, rows, global_batch_size)
    indices = stream_indices(stream_positions, len(self.labels), self.seed)
    images = self.images[indices]
    if self.random_flip:
      images = apply_flips(images, flip_mask(self.seed, stream_positions))
    return dict(image=images, label=self.labels[indices])


# --- synthetic ---------------------------------------------------------------------------

class SyntheticSource:
  """Standard-normal images and uniform labels from (seed, position): real shapes, no data."""

  def __init__(self, *, image_size: int, channels: int, num_classes: int, seed: int):
    self.element_shape = (image_size, image_size, channels)
    self.num_classes = num_classes
    self.seed = seed

  def batch(self, batch_index: int, rows: np.ndarray, global_batch_size: int) -> dict:
    stream_positions = positions(batch_index, rows, global_batch_size)
    images = np.empty((len(rows),) + self.element_shape, np.float32)
    labels = np.empty((len(rows),), np.int32)
    for i, position in enumerate(stream_positions):
      rng = example_rng(self.seed, SYNTHETIC, position)
      labels[i] = rng.integers(max(self.num_classes, 1))   # num_classes = 0: unconditional
      images[i] = rng.standard_normal(self.element_shape, dtype=np.float32)
    return dict(image=images, label=labels)


# --- a d-dimensional subspace of image space -----------------------------------------------

# The subspace's basis and class means are fixed (not the run's seed): samples of any run are
# scored against the same set (benchmarks/pmf_targets.py).
SUBSPACE_SEED = 20260
SUBSPACE_CLASS_STD = 0.5   # per-coordinate std of a class around its mean; the means have
                           # std sqrt(1 - 0.5²), so the coordinates have unit variance


@functools.lru_cache(maxsize=4)
def subspace_basis(shape: tuple, intrinsic_dim: int, num_classes: int):
  """(basis [D, d] with orthonormal columns, class means [max(num_classes, 1), d]) of the
  subspace source, D = prod(shape); a pure function of its arguments (SUBSPACE_SEED)."""
  ambient = int(np.prod(shape))
  if not 0 < intrinsic_dim <= ambient:
    raise ValueError(f"data.intrinsic_dim={intrinsic_dim} must be in [1, {ambient}] "
                     f"(the image has {ambient} values)")
  rng = np.random.default_rng((SUBSPACE_SEED, ambient, intrinsic_dim, num_classes))
  basis, _ = np.linalg.qr(rng.standard_normal((ambient, intrinsic_dim)))
  spread = np.sqrt(1.0 - SUBSPACE_CLASS_STD ** 2)
  means = spread * rng.standard_normal((max(num_classes, 1), intrinsic_dim))
  return basis.astype(np.float32), means.astype(np.float32)


class SubspaceSource:
  """k-Diff's D >> d setting as images: x = A·z reshaped to (S, S, C), A a fixed [D, d] basis
  with orthonormal columns, z = mu_y + 0.5·N(0, I_d) around the class mean mu_y (unit variance
  per coordinate, so E||x||² = d against E||n||² = D for the noise; Jin & Wang 2026's
  dimensionality experiment, here class-conditional). Labels uniform; per-example draws from
  (seed, position)."""

  def __init__(self, *, image_size: int, channels: int, num_classes: int, intrinsic_dim: int,
               seed: int):
    self.element_shape = (image_size, image_size, channels)
    self.num_classes = num_classes
    self.basis, self.means = subspace_basis(self.element_shape, intrinsic_dim, num_classes)
    self.seed = seed

  def batch(self, batch_index: int, rows: np.ndarray, global_batch_size: int) -> dict:
    stream_positions = positions(batch_index, rows, global_batch_size)
    coordinates = np.empty((len(rows), self.basis.shape[1]), np.float32)
    labels = np.empty((len(rows),), np.int32)
    for i, position in enumerate(stream_positions):
      rng = example_rng(self.seed, SUBSPACE, position)
      labels[i] = rng.integers(max(self.num_classes, 1))
      coordinates[i] = self.means[labels[i]] + SUBSPACE_CLASS_STD * rng.standard_normal(
          self.basis.shape[1])
    images = (coordinates @ self.basis.T).reshape((len(rows),) + self.element_shape)
    return dict(image=images.astype(np.float32), label=labels)


# --- 2-D toys ----------------------------------------------------------------------------

EIGHT_GAUSSIANS_RADIUS = 2.0
EIGHT_GAUSSIANS_STD = 0.1
MOONS_NOISE_STD = 0.05


def sample_toy2d(name: str, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
  """n points [n, 2] float32 and labels [n] int32 of a 2-D toy distribution.

  * '8gaussians': mixture component k in 0..7 with centre 2·(cos(kπ/4), sin(kπ/4)) and
    std 0.1 per coordinate; label = k. Per-coordinate std ≈ 1.42.
  * 'moons': sklearn-style two interleaved half circles, (cos θ, sin θ) and
    (1 − cos θ, 1/2 − sin θ) with θ ~ U[0, π], Gaussian noise std 0.05, shifted by
    (−1/2, −1/4) to be centred; label = moon 0 or 1. Per-coordinate std ≈ (0.87, 0.50).
  * 'checkerboard': uniform on the 8 dark unit squares of a 4×4 board on [−2, 2]²
    (FFJORD's); label 0. Per-coordinate std ≈ 1.15.
  """
  if name == "8gaussians":
    labels = rng.integers(0, 8, size=n)
    angle = labels * (np.pi / 4)
    centres = EIGHT_GAUSSIANS_RADIUS * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    points = centres + EIGHT_GAUSSIANS_STD * rng.standard_normal((n, 2))
  elif name == "moons":
    labels = rng.integers(0, 2, size=n)
    theta = rng.uniform(0.0, np.pi, size=n)
    upper = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    lower = np.stack([1.0 - np.cos(theta), 0.5 - np.sin(theta)], axis=1)
    points = np.where(labels[:, None] == 0, upper, lower)
    points = points + MOONS_NOISE_STD * rng.standard_normal((n, 2)) - np.array([0.5, 0.25])
  elif name == "checkerboard":
    x1 = rng.uniform(-2.0, 2.0, size=n)
    x2 = rng.uniform(0.0, 1.0, size=n) - 2.0 * rng.integers(0, 2, size=n)
    x2 = x2 + np.floor(x1) % 2
    points = np.stack([x1, x2], axis=1)
    labels = np.zeros(n, np.int64)
  else:
    raise ValueError(f"data.toy_name = {name!r}; allowed values: {', '.join(TOY_NAMES)}")
  return points.astype(np.float32), labels.astype(np.int32)


class Toy2dSource:
  """2-D toy points: global batch b is sample_toy2d(name, default_rng((seed, TOY, b)), B)."""

  def __init__(self, *, toy_name: str, seed: int):
    if toy_name not in TOY_NAMES:
      raise ValueError(f"data.toy_name = {toy_name!r}; allowed values: {', '.join(TOY_NAMES)}")
    self.toy_name = toy_name
    self.seed = seed
    self.element_shape = (2,)

  def batch(self, batch_index: int, rows: np.ndarray, global_batch_size: int) -> dict:
    rng = np.random.default_rng((_seed_int(self.seed), TOY, int(batch_index)))
    points, labels = sample_toy2d(self.toy_name, rng, global_batch_size)
    return dict(image=points[rows], label=labels[rows])

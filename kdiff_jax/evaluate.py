"""Sample quality at scale: FID, Inception Score and precision/recall with a Flax InceptionV3.

Every process runs the same calls; arrays are split over the batch axes of the mesh:

  balanced labels + noise -> the sampler (sampling.build; jit, batch-sharded) [-> VAE decoder for latent
  models] -> each process's rows to host -> images.to_uint8 (the one uint8 conversion, so the
  metrics see exactly the images one would save) -> InceptionV3 (jit, batch-sharded) -> each
  process keeps its rows' 2048-d pool features and 1008 logits -> after the last batch, one
  process_allgather -> float64 statistics, the same on every host.

Reference: eval.reference_path, an ADM-format .npz (guided-diffusion `evaluations/`: `mu`,
`sigma` of the pool features and `arr_0`, the reference images, which precision/recall
featurizes); or, when empty, the first eval.reference_num_examples images of the training data
stream (pixel datasets). ADM's `mu`/`sigma` come from the TensorFlow graph; pytorch-fid's port
of the same weights (models/inception.py) gives FIDs that agree closely, not bit for bit.
Inception weights: eval.inception_path (pytorch-fid's .pth, or its .npz conversion).

* FID (Heusel et al. 2017): |μ_r − μ_g|² + tr Σ_r + tr Σ_g − 2·tr (Σ_r^½ Σ_g Σ_r^½)^½.
* Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) ‖ p(y)) over the 1008 classes of
  the weights, averaged over 10 splits.
* Precision / recall (Kynkäänniemi et al. 2019), k = 3: a sample is "precise" if it lies within
  the distance from some reference feature to that feature's 3rd nearest reference neighbour;
  recall swaps the roles.

`training_actions` builds the training loop's actions that need the VAE or Inception (the
decoded sample grid, the periodic FID-n): main.py hands it to train.train_and_evaluate, so that
the loop itself imports neither. `evaluate` is main.py --mode=eval, which restores only the
sampling weights (state.Weights) and builds no optimizer.
"""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from kdiff_jax import actions, console, data, images, parallel, sampling, state, viewing
from kdiff_jax.data import latents
from kdiff_jax.export import weight_files

K_NEAREST = 3
IS_SPLITS = 10


# --- metrics -----------------------------------------------------------------------------

def statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mean, covariance) of [N, D] features in float64 (unbiased covariance, as ADM/pytorch-fid)."""
  features = np.asarray(features, np.float64)
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _resolved(eigenvalues: np.ndarray) -> np.ndarray:
  """Eigenvalues of a symmetric PSD matrix with those below round-off (D·eps·max|λ|, the
  numerical-rank cut of np.linalg.matrix_rank) set to 0: their square roots would be noise."""
  cut = len(eigenvalues) * np.finfo(np.float64).eps * np.abs(eigenvalues).max(initial=0.0)
  return np.where(eigenvalues > cut, eigenvalues, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """The symmetric square root of a symmetric PSD matrix."""
  eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (eigenvectors * np.sqrt(_resolved(eigenvalues))) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2), in float64.

  tr (Σ1 Σ2)^½ = Σ_i √λ_i(Σ1^½ Σ2 Σ1^½): the product is similar to a symmetric PSD matrix,
  so symmetric eigendecompositions suffice (no complex sqrtm round-off).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  root1 = _psd_sqrt(sigma1)
  inner = root1 @ sigma2 @ root1
  trace_sqrt = np.sqrt(_resolved(np.linalg.eigvalsh((inner + inner.T) / 2))).sum()
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def inception_score(logits, num_splits: int = IS_SPLITS) -> float:
  """exp(mean_x KL(p(y|x) ‖ p(y))) per split of the samples, p(y) the split's mean; mean of splits."""
  logits = np.asarray(logits, np.float64)
  log_p = logits - logits.max(axis=1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
  scores = []
  for part in np.array_split(log_p, min(num_splits, len(log_p))):
    p = np.exp(part)
    marginal = p.mean(axis=0)
    # p·(log p − log p(y)), 0 where p = 0 (then p(y) may be 0 too).
    terms = np.where(p > 0, p * (part - np.log(np.where(marginal > 0, marginal, 1.0))), 0.0)
    scores.append(np.exp(np.mean(np.sum(terms, axis=1))))
  return float(np.mean(scores))


def _squared_distances(queries, points):
  """[Q, P] squared Euclidean distances, float32, |q|² − 2 q·p + |p|² clamped at 0."""
  cross = jnp.einsum("qd,pd->qp", queries, points, precision=jax.lax.Precision.HIGHEST)
  squared = (jnp.sum(queries**2, axis=1)[:, None] - 2 * cross
             + jnp.sum(points**2, axis=1)[None, :])
  return jnp.maximum(squared, 0.0)


@jax.jit
def _kth_neighbour_chunk(queries, points):
  """Squared distance from each query to its K_NEAREST-th nearest point, the query itself
  (distance 0, a member of points) counted as the 0th."""
  return -jax.lax.top_k(-_squared_distances(queries, points), K_NEAREST + 1)[0][:, K_NEAREST]


@jax.jit
def _covered_chunk(queries, points, radii_squared):
  """Whether each query lies in some ball |x − points[j]| <= radius[j]."""
  return jnp.any(_squared_distances(queries, points) <= radii_squared[None, :], axis=1)


def _in_chunks(function, queries, *args, chunk: int = 1024):
  """function(chunk of queries, *args) over fixed-size zero-padded chunks, concatenated."""
  queries = np.asarray(queries, np.float32)
  chunk = min(chunk, len(queries))
  out = []
  for start in range(0, len(queries), chunk):
    part = queries[start:start + chunk]
    padded = np.zeros((chunk,) + queries.shape[1:], np.float32)
    padded[:len(part)] = part
    out.append(np.asarray(function(padded, *args))[:len(part)])
  return np.concatenate(out)


def precision_recall(real, fake) -> tuple[float, float]:
  """Kynkäänniemi et al. 2019 improved precision and recall with k = K_NEAREST (float32)."""
  real, fake = np.asarray(real, np.float32), np.asarray(fake, np.float32)
  real_radii = _in_chunks(_kth_neighbour_chunk, real, real)
  fake_radii = _in_chunks(_kth_neighbour_chunk, fake, fake)
  precision = _in_chunks(_covered_chunk, fake, real, real_radii).mean()
  recall = _in_chunks(_covered_chunk, real, fake, fake_radii).mean()
  return float(precision), float(recall)


# --- sampling and featurizing across hosts -----------------------------------------------

def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in increasing row order."""
  shards = {shard.index[0].start or 0: shard for shard in array.addressable_shards}
  return np.concatenate([np.asarray(shards[start].data) for start in sorted(shards)])


def _replicated(tree, mesh):
  sharding = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]), tree)


class Evaluator:
  """Samples, reference images and their Inception features on a mesh.

  sample(params, noise, labels, key) is the run's sampler (sampling.build).
  """

  def __init__(self, config, mesh, sample):
    self.config = config
    self.batch_size = config.eval.batch_size
    self.sharding = parallel.batch_sharding(mesh, config.mesh.rules)
    parallel.check_batch(self.batch_size, self.sharding, field="eval.batch_size")
    self.rows = data.rows_for_process(self.sharding, self.batch_size, jax.process_index())
    if not config.eval.inception_path:
      raise ValueError(
          "eval.inception_path is empty: download pytorch-fid's pt_inception-2015-12-05-"
          "6726825d.pth (see kdiff_jax/export/weight_files.py) and point eval.inception_path at "
          "it.")
    graphdef, params = weight_files.inception(config.eval.inception_path)
    self.inception_params = _replicated(params, mesh)
    self._inception = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x),
                              out_shardings=(self.sharding, self.sharding))

    vae_graphdef, self.vae_params = None, None  # latent models: samples go through the decoder
    if config.data.name == "latents":
      if not config.data.vae_path:
        raise ValueError("Sample metrics of a latent model need data.vae_path (the VAE decoder).")
      vae_graphdef, vae_params, _ = weight_files.vae(config.data.vae_path)
      self.vae_params = _replicated(vae_params, mesh)
    shape = (self.batch_size, config.data.image_size, config.data.image_size,
             config.data.channels)

    def generate(params, vae_params, key, labels):
      key_noise, key_sampler = jax.random.split(key)
      noise = config.objective.noise_std * jax.random.normal(key_noise, shape, jnp.float32)
      noise = jax.lax.with_sharding_constraint(noise, self.sharding)
      x = sample(params, noise, labels, key_sampler)
      if vae_params is not None:
        x = nnx.merge(vae_graphdef, vae_params).decode(latents.unnormalize(x, config.data))
      return x

    self._generate = jax.jit(generate, out_shardings=self.sharding)

  def dry_run(self, abstract_params) -> None:
    """Trace sampling, decoding and Inception with abstract shapes (nothing runs)."""
    labels = jax.ShapeDtypeStruct((self.batch_size,), jnp.int32, sharding=self.sharding)
    images = jax.eval_shape(self._generate, abstract_params, self.vae_params, jax.random.key(0),
                            labels)
    jax.eval_shape(self._inception, self.inception_params,
                   jax.ShapeDtypeStruct(images.shape, jnp.uint8, sharding=self.sharding))

  def features(self, num_examples: int, local_uint8) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, 2048], logits [N, 1008]) of global rows 0..N−1, gathered on every host.

    local_uint8(b) gives this process's rows of global batch b as uint8 images.
    """
    features, logits, rows = [], [], []
    for batch in range(math.ceil(num_examples / self.batch_size)):
      uint8 = local_uint8(batch)
      x = jax.make_array_from_process_local_data(
          self.sharding, uint8, (self.batch_size,) + uint8.shape[1:])
      batch_features, batch_logits = self._inception(self.inception_params, x)
      features.append(local_rows(batch_features))
      logits.append(local_rows(batch_logits))
      rows.append(batch * self.batch_size + self.rows)
    features, logits, rows = (
        np.asarray(multihost_utils.process_allgather(np.concatenate(part), tiled=True))
        for part in (features, logits, rows))
    keep = np.flatnonzero(rows < num_examples)
    keep = keep[np.argsort(rows[keep])]
    return features[keep], logits[keep]

  def sample_features(self, params, num_samples: int):
    """Features and logits of num_samples samples, classes cycled (balanced), sampling.seed."""
    config = self.config
    total = math.ceil(num_samples / self.batch_size) * self.batch_size
    labels = sampling.cycling_labels(total, sampling.all_classes(config))
    key = jax.random.key(config.sampling.seed)

    def local_uint8(batch):
      part = labels[batch * self.batch_size:(batch + 1) * self.batch_size]
      global_labels = jax.make_array_from_callback(part.shape, self.sharding,
                                                   lambda index: part[index])
      samples = self._generate(params, self.vae_params, jax.random.fold_in(key, batch),
                               global_labels)
      return images.to_uint8(local_rows(samples))

    return self.features(num_samples, local_uint8)

  def reference(self, with_features: bool) -> dict:
    """{'mu', 'sigma'} of the reference, plus 'features' (or None) when with_features."""
    config = self.config
    path = config.eval.reference_path
    if path:
      with np.load(path) as archive:
        stored = {key: archive[key] for key in ("mu", "sigma", "arr_0") if key in archive.files}
      if "arr_0" not in stored and not {"mu", "sigma"} <= set(stored):
        raise ValueError(f"eval.reference_path = {path!r} has neither mu/sigma nor arr_0 "
                         "(the ADM reference-batch format).")
      features = None
      if "arr_0" in stored and (with_features or "mu" not in stored):
        reference_uint8 = stored["arr_0"]
        features, _ = self.features(
            len(reference_uint8),
            lambda b: _pad_rows(reference_uint8, b, self.batch_size)[self.rows])
      mu, sigma = ((stored["mu"], stored["sigma"]) if "mu" in stored
                   else statistics(features))
      return dict(mu=mu, sigma=sigma, features=features)
    if config.data.name == "latents":
      raise ValueError("eval.reference_path is empty and data.name = 'latents': give the ADM "
                       "reference batch of the image dataset (e.g. VIRTUAL_imagenet256_labeled.npz).")
    num = config.eval.reference_num_examples
    iterator = data.build_iterator(config.data, global_batch_size=self.batch_size,
                                   sharding=self.sharding, seed=config.seed,
                                   field="eval.batch_size")
    features, _ = self.features(
        num, lambda b: images.to_uint8(local_rows(next(iterator)["image"])))
    mu, sigma = statistics(features)
    return dict(mu=mu, sigma=sigma, features=features if with_features else None)


def _pad_rows(array: np.ndarray, batch: int, batch_size: int) -> np.ndarray:
  """Rows [b·B, (b+1)·B) of array, zero-padded past its end."""
  part = array[batch * batch_size:(batch + 1) * batch_size]
  padded = np.zeros((batch_size,) + array.shape[1:], array.dtype)
  padded[:len(part)] = part
  return padded


class FidAction:
  """fid(params) -> {'fid_N': FID-N, 'inception_score_N': IS} with N = eval.fid_num_samples.

  params are the sampling weights. The reference statistics (`reference`) are computed at the
  first call and kept.
  """

  def __init__(self, config, mesh, sample):
    self.evaluator = Evaluator(config, mesh, sample)
    self.num_samples = config.eval.fid_num_samples
    self.reference = None

  def __call__(self, params) -> dict:
    if self.reference is None:
      self.reference = self.evaluator.reference(with_features=False)
    features, logits = self.evaluator.sample_features(params, self.num_samples)
    fid = frechet_distance(*statistics(features), self.reference["mu"], self.reference["sigma"])
    return {f"fid_{self.num_samples}": fid,
            f"inception_score_{self.num_samples}": inception_score(logits)}


class Fid:
  """The loop's action every eval.fid_every steps and at the last: FID-n and IS of
  eval.fid_num_samples samples."""

  def __init__(self, context: actions.Sampling):
    self.every = context.config.eval.fid_every
    self.params_of = context.params_of
    self.fid = FidAction(context.config, context.mesh, context.sample)
    self.writer = context.writer

  def due(self, step: int, last: bool) -> bool:
    return last or step % self.every == 0

  def dry_run(self, abstract_params) -> None:
    self.fid.evaluator.dry_run(abstract_params)

  def __call__(self, step: int, state) -> None:
    metrics = self.fid(self.params_of(state))
    self.writer.scalars(step, metrics)
    console.info("fid       step %d: %s", step,
                 ", ".join(f"{name} {value:.3f}" for name, value in metrics.items()))


def training_actions(context: actions.Sampling) -> list:
  """The training loop's sampling actions: the sample grid, latents decoded by the VAE
  (viewing.viewable), and with eval.fid_every the in-loop FID-n."""
  config = context.config
  found = [actions.SampleGrid(context, show=lambda samples: viewing.viewable(config, samples))]
  if config.eval.fid_every:
    found.append(Fid(context))
  return found


def evaluate(config, workdir: str, step=None) -> dict:
  """main.py --mode=eval: FID, IS, precision and recall of eval.num_samples samples of the
  checkpoint in workdir (sampler, steps and guidance from config.sampling); writes a .json."""
  mesh = parallel.make_mesh(config.mesh)
  weights = state.Weights(config, mesh)
  params, step = weights.restore(workdir, use_ema=config.sampling.use_ema, step=step)
  console.info("eval: step %d of %s (%s weights)", step, workdir,
               "EMA" if config.sampling.use_ema else "raw")
  sample = sampling.build(config, weights.objective.description, weights.model.apply)
  evaluator = Evaluator(config, mesh, sample)
  num = config.eval.num_samples
  features, logits = evaluator.sample_features(params, num)
  reference = evaluator.reference(with_features=True)
  results = dict(step=step, num_samples=num,
                 fid=frechet_distance(*statistics(features), reference["mu"], reference["sigma"]),
                 inception_score=inception_score(logits))
  if reference["features"] is not None:
    results["precision"], results["recall"] = precision_recall(reference["features"], features)
  sampling_config = config.sampling
  name = (f"eval_step{step}_{sampling_config.method}_{sampling_config.num_steps}steps"
          f"_w{sampling_config.guidance_scale:g}_n{num}.json")
  path = os.path.join(workdir, name)
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(results, f, indent=1)
  console.info("eval: %s -> %s", ", ".join(f"{k} {v:.4g}" for k, v in results.items()
                                           if k not in ("step", "num_samples")), path)
  return results

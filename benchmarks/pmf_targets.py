"""k-Diff's question asked of a one-step model: which target should pixel MeanFlow's network predict?

pMF's network predicts x for its two heads and turns the predictions into the average and the
instantaneous velocity, u = (z - x_u)/clip(t, t_floor, 1) (docs/objectives/pmf.md). With
model.prediction the same network predicts the velocity v = e - x, eps (the noise) or k-Diff's
u_k = k·x - (1 - k)·n with k = sigmoid(30·w_k) learned with the network from k = 1/2
(docs/objectives/kdiff.md; the scale 30 of configs/kdiff_digits.py lets k travel in 600 steps),
and `parameterization` turns each into x at the same t floor. Everything else is the shipped
configs/pmf_digits.py run (objective, optimizer, EMA, steps), trained through the real command

  python main.py --config=configs/pmf_digits.py --workdir=<root>/<set>_<target>
      --config.model.prediction=<target> [the set's data and patch overrides]

on two sets:

  digits    sklearn's 8x8 digits as shipped, D = 64 pixels with a small intrinsic dimension
            (PCA: 21 components hold 90% of the variance; benchmarks/kdiff_digits.py)
  subspace  data.name = 'subspace': class-conditional images on a random d = 8 dimensional
            subspace of 16x16x3 = 768-dimensional image space (kdiff_jax/data/builtin.py), the
            D >> d setting of k-Diff's dimensionality experiment, where k* = D/(D + d) = 0.99

Scored at 1 and 2 sampling steps, at the demo's guidance ω = 3 and without (ω = 1), on 500
class-conditional samples (labels cycling, seed 123, the EMA weights):

  digits    conditional accuracy (tests/test_demo.py's classifier) / class-wise energy
            distance to the real digits (benchmarks/few_step.py's, floor printed)
  subspace  conditional accuracy (nearest class mean of the coordinates A^T x) / class-wise
            energy distance of the coordinates to 250 fresh draws of the class / the
            off-subspace RMS |(I - A A^T) x| / sqrt(D) (0 for the data; pure noise gives 1)

and the learned k of the u_k runs (the EMA's, the one that samples).

  python benchmarks/pmf_targets.py [--sets=digits,subspace] [--targets=x,velocity,eps,u_k]
      [--steps=N (default: the config's)] [--workdir_root=/tmp/pmf_targets]
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from benchmarks.distances import class_energy_distance, energy_distance, real_digits  # noqa: E402
from configs import pmf_digits  # noqa: E402
from kdiff_jax import parallel, state  # noqa: E402
from kdiff_jax.data import builtin  # noqa: E402

# target -> its own overrides: k-Diff's k moves by about the learning rate per step under Adam;
# w_k_scale 30 lets it travel in a demo's steps, as configs/kdiff_digits.py does.
TARGETS = {"x": {}, "velocity": {}, "eps": {}, "u_k": {"objective.kdiff.w_k_scale": 30.0}}
# set -> the config overrides that make it (on top of configs/pmf_digits.py)
SETS = {
    "digits": {},
    "subspace": {"data.name": "subspace", "data.image_size": 16, "data.channels": 3,
                 "data.intrinsic_dim": 8, "data.num_classes": 10, "model.patch_size": 4},
}
# (ω, sampling steps) of each score: the demo's guidance and none.
SAMPLINGS = ((3.0, 1), (3.0, 2), (1.0, 1), (1.0, 2))

flags.DEFINE_list("sets", list(SETS), f"Data sets: {', '.join(SETS)}.")
flags.DEFINE_list("targets", list(TARGETS), f"Network targets: {', '.join(TARGETS)}.")
flags.DEFINE_integer("steps", 0, "Training steps (0: the config's).")
flags.DEFINE_string("workdir_root", "/tmp/pmf_targets", "One workdir per run under it (reused).")
flags.DEFINE_integer("num_samples", 500, "Samples per score.")
FLAGS = flags.FLAGS


def overrides(data_set, target):
  """{config field: value} of one run, on top of configs/pmf_digits.py."""
  return {**SETS[data_set], "model.prediction": target, **TARGETS[target]}


def run_config(data_set, target):
  config = pmf_digits.get_config()
  for field, value in overrides(data_set, target).items():
    *sections, name = field.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[name] = value
  if FLAGS.steps:
    config.training.num_steps = FLAGS.steps
  return config


def train(data_set, target, workdir):
  """Runs main.py once (or reuses the workdir's run): {'seconds', 'command', 'steps'}."""
  record_path = os.path.join(workdir, "pmf_targets.json")
  steps = run_config(data_set, target).training.num_steps
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
    if record["steps"] == steps:
      return record
    raise ValueError(f"--workdir_root: {workdir} holds a run of {record['steps']} steps, not "
                     f"{steps}: use another --workdir_root")
  command = [sys.executable, "main.py", "--config=configs/pmf_digits.py", f"--workdir={workdir}",
             *(f"--config.{field}={value}" for field, value in
               {**overrides(data_set, target), "training.num_steps": steps}.items())]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  start = time.perf_counter()
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if result.returncode:
    raise RuntimeError(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-3000:]}")
  record = dict(steps=steps, seconds=seconds, command=" ".join(command[1:]))
  with open(record_path, "w") as f:
    json.dump(record, f)
  return record


def learned_k(config, workdir):
  """sigmoid(w_k) of the sampling weights (the EMA's), or None where the net has no w_k."""
  weights = state.Weights(config, parallel.make_mesh(config.mesh))
  params, _ = weights.restore(workdir, use_ema=config.sampling.use_ema)
  found = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
           if "w_k" in jax.tree_util.keystr(path)]
  return float(jax.nn.sigmoid(np.asarray(found[0]).reshape(()))) if found else None


def subspace_draws(config, per_class, seed):
  """{class: [per_class, d] coordinates drawn from the subspace source's law}."""
  shape = (config.data.image_size, config.data.image_size, config.data.channels)
  _, means = builtin.subspace_basis(shape, config.data.intrinsic_dim, config.data.num_classes)
  rng = np.random.default_rng(seed)
  return {c: means[c] + builtin.SUBSPACE_CLASS_STD * rng.standard_normal((per_class, means.shape[1]))
          for c in range(config.data.num_classes)}


def subspace_scores(config, images, labels):
  """(accuracy, class-wise energy distance of the coordinates to 250 draws per class,
  off-subspace RMS) of samples."""
  shape = (config.data.image_size, config.data.image_size, config.data.channels)
  basis, means = builtin.subspace_basis(shape, config.data.intrinsic_dim, config.data.num_classes)
  flat = images.reshape(len(images), -1).astype(np.float64)
  coordinates = flat @ basis
  off = flat - coordinates @ basis.T
  nearest = np.argmin(((coordinates[:, None] - means[None]) ** 2).sum(-1), axis=1)
  reference = subspace_draws(config, 250, seed=0)
  distance = np.mean([energy_distance(coordinates[labels == c], reference[c]) for c in reference])
  return (float(np.mean(nearest == labels)), float(distance),
          float(np.sqrt(np.mean(off ** 2))))


def subspace_floor(config, per_class):
  """The energy distance a perfect sampler scores: fresh draws of the law against the reference."""
  reference, fresh = subspace_draws(config, 250, seed=0), subspace_draws(config, per_class, seed=1)
  return float(np.mean([energy_distance(fresh[c], reference[c]) for c in reference]))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  for given, allowed, flag in ((FLAGS.sets, SETS, "--sets"), (FLAGS.targets, TARGETS, "--targets")):
    if set(given) - set(allowed):
      raise ValueError(f"{flag}={sorted(set(given) - set(allowed))}: allowed values are "
                       f"{list(allowed)}")
  from tests.test_demo import conditional_samples, digit_classifier
  classifier, real = digit_classifier(), real_digits()
  per_class = FLAGS.num_samples // 10
  floor = np.mean([energy_distance(real[c][1][:per_class], real[c][0]) for c in real])
  rows = []
  for data_set in FLAGS.sets:
    for target in FLAGS.targets:
      workdir = os.path.join(FLAGS.workdir_root, f"{data_set}_{target}")
      record = train(data_set, target, workdir)
      config = run_config(data_set, target)
      scores = []
      for omega, n in SAMPLINGS:
        config.sampling.num_steps = n
        config.sampling.guidance_scale = omega
        images, labels = conditional_samples(config, workdir, FLAGS.num_samples)
        if data_set == "digits":
          accuracy = float(np.mean(classifier.predict(images) == labels))
          scores.append(f"{accuracy:.3f} / {class_energy_distance(images, labels, real):.3f}")
        else:
          scores.append("{:.3f} / {:.3f} / {:.3f}".format(*subspace_scores(config, images, labels)))
      k = learned_k(config, workdir)
      rows.append((data_set, target, scores, "" if k is None else f"{k:.3f}"))
      print(f"{data_set} {target}: {scores}, k {rows[-1][-1]} ({record['command']})", flush=True)

  subspace = run_config("subspace", "x")
  print(f"\npMF on digits (D = 64) and on a d = 8 subspace of 16x16x3 images (D = 768), "
        f"{FLAGS.num_samples} samples. digits: accuracy / energy distance (floor {floor:.3f}); "
        "subspace: accuracy / energy distance of the coordinates (floor "
        f"{subspace_floor(subspace, per_class):.3f}) / off-subspace RMS")
  header = " | ".join(f"{n} step{'s' * (n > 1)}, ω {omega:g}" for omega, n in SAMPLINGS)
  print(f"| set | target | {header} | learned k |")
  print("|---|---|" + "---|" * len(SAMPLINGS) + "---|")
  for data_set, target, scores, k in rows:
    print(f"| {data_set} | {target} | {' | '.join(scores)} | {k} |")


if __name__ == "__main__":
  app.run(main)

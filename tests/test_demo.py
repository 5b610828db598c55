"""The README's demo: digits flow matching trains on CPU and its samples are the right digits.

A logistic-regression classifier trained on the real digits (never on samples) labels 500
class-conditional samples; at least 80% must carry the class they were conditioned on.
"""
import glob
import os

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from kdiff_jax import parallel, sampling, state

# pytest-xdist runs the tests that share the digits demo on one worker.
pytestmark = pytest.mark.xdist_group("digits_fm")


def digit_classifier():
  digits = load_digits()
  x = digits.images.reshape(len(digits.images), -1) / 8.0 - 1.0
  return LogisticRegression(max_iter=2000).fit(x, digits.target)


def conditional_samples(config, workdir, num_samples=500, seed=123):
  """([num_samples, pixels] samples, [num_samples] labels) of the run in workdir (its sampling
  weights), the labels cycling over the classes."""
  mesh = parallel.make_mesh(config.mesh)
  weights = state.Weights(config, mesh)
  params, _ = weights.restore(workdir, use_ema=config.sampling.use_ema)
  labels = sampling.cycling_labels(num_samples, range(config.data.num_classes))
  sample = sampling.build(config, weights.objective.description, weights.model.apply)
  images = sampling.make_sampler(config, sample, mesh, labels)(params, jax.random.key(seed))
  return np.asarray(images).reshape(num_samples, -1), labels


def conditional_accuracy(config, workdir, num_samples=500, seed=123):
  """Fraction of samples whose classifier label is the class they were conditioned on."""
  images, labels = conditional_samples(config, workdir, num_samples, seed)
  return float(np.mean(digit_classifier().predict(images) == labels))


def test_demo_writes_checkpoints_events_and_grid(digits_fm_run):
  config, workdir = digits_fm_run
  steps = [int(name) for name in os.listdir(os.path.join(workdir, "checkpoints"))]
  assert max(steps) == config.training.num_steps
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  assert glob.glob(os.path.join(workdir, "samples", "step_*.png"))


def test_demo_samples_are_the_conditioned_digits(digits_fm_run):
  config, workdir = digits_fm_run
  accuracy = conditional_accuracy(config, workdir)
  print(f"digits_fm conditional accuracy: {accuracy:.3f}")
  assert accuracy >= 0.8


def test_demo_console_is_short_and_says_what_it_did(digits_fm_run):
  """The README's first command prints a header, a line per log_every, a line per checkpoint
  and per sample grid with its path, and a summary: no library chatter, at most 50 lines."""
  config, workdir = digits_fm_run
  with open(os.path.join(workdir, "console.txt")) as f:
    lines = f.read().splitlines()
  print(f"{len(lines)} console lines:", *lines, sep="\n")
  assert len(lines) <= 50
  text = "\n".join(lines)
  steps = config.training.num_steps
  assert "configs/digits_fm.py" in lines[0] and workdir in lines[0]
  assert "179,588 parameters" in text and "global batch 128" in text and "1 cpu device" in text
  assert sum(f"step {s}/{steps}" in text for s in range(100, steps + 1, 100)) == steps // 100
  every = config.training.checkpoint_every
  assert config.training.sample_every == every and steps // every == 3
  for step in range(every, steps + 1, every):
    assert f"checkpoint step {step} -> {workdir}/checkpoints/{step}" in text
    assert f"samples/step_{step:08d}.png" in text
  assert f"done: steps 1-{steps}" in lines[-1]
  assert not any(word in text.lower() for word in ("orbax", "absl", "tensorflow"))

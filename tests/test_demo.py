"""The README's demo: digits flow matching trains on CPU and its samples are the right digits.

A logistic-regression classifier trained on the real digits (never on samples) labels 500
class-conditional samples; at least 80% must carry the class they were conditioned on.
"""
import glob
import os

import jax
import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from kdiff_jax import checkpoint, train


def digit_classifier():
  digits = load_digits()
  x = digits.images.reshape(len(digits.images), -1) / 8.0 - 1.0
  return LogisticRegression(max_iter=2000).fit(x, digits.target)


def conditional_accuracy(config, workdir, num_samples=500, seed=123):
  """Fraction of samples whose classifier label is the class they were conditioned on."""
  s = train.setup(config)
  mngr = checkpoint.manager(workdir, config.checkpoint)
  state, _ = checkpoint.restore(mngr, s.abstract_state)
  labels = train.cycling_labels(num_samples, range(config.data.num_classes))
  sample = train.make_sample_fn(s, labels)
  images = np.asarray(sample(train.sampling_params(state, config), jax.random.key(seed)))
  predicted = digit_classifier().predict(images.reshape(num_samples, -1))
  return float(np.mean(predicted == labels))


def test_demo_writes_checkpoints_events_and_grid(digits_fm_run):
  config, workdir = digits_fm_run
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == str(config.training.num_steps)
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  assert glob.glob(os.path.join(workdir, "samples", "step_*.png"))


def test_demo_samples_are_the_conditioned_digits(digits_fm_run):
  config, workdir = digits_fm_run
  accuracy = conditional_accuracy(config, workdir)
  print(f"digits_fm conditional accuracy: {accuracy:.3f}")
  assert accuracy >= 0.8

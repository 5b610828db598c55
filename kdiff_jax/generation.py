"""main.py --mode=sample: draw samples from a trained checkpoint into an .npz and a PNG grid.

The checkpoint's own objective picks the sampler family (ODE samplers with guidance for flow
and k-Diff, pushforward for IMM); config.sampling picks the method, steps, guidance and classes.
"""
import os

import jax
import numpy as np

from kdiff_jax import checkpoint, images, parallel, train
from kdiff_jax.data import latents


def generate(config, workdir: str, step=None) -> str:
  """Sample config.sampling.num_samples images from the checkpoint in workdir; return the .npz path."""
  s = train.setup(config)
  state = checkpoint.load_state(workdir, config.checkpoint, s.abstract_state, step)
  step = int(state["step"])
  sampling = config.sampling
  classes = tuple(sampling.classes) or tuple(range(config.data.num_classes))
  if any(not 0 <= c < config.data.num_classes for c in classes):
    raise ValueError(f"sampling.classes={classes}: each must be in [0, {config.data.num_classes})")
  labels = train.cycling_labels(sampling.num_samples, classes)
  sample_fn = train.make_sample_fn(s, labels)
  samples = np.asarray(sample_fn(train.sampling_params(state, config), jax.random.key(sampling.seed)))

  name = f"samples_step{step}_{sampling.method}_{sampling.num_steps}steps_w{sampling.guidance_scale:g}"
  path = os.path.join(workdir, name + ".npz")
  if jax.process_index() == 0:
    np.savez(path, images=samples, uint8=images.to_uint8(samples), labels=labels)
    shown = latents.decode_for_display(config, samples[:sampling.grid_size**2])
    images.save_grid(shown, os.path.join(workdir, name + ".png"))
  parallel.log_once("wrote %d samples to %s", len(samples), path)
  return path

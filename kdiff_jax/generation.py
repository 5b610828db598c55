"""main.py --mode=sample: draw samples from a trained checkpoint into an .npz and a PNG grid.

Only the sampling weights are read (state.Weights: the first EMA, or the raw weights with
sampling.use_ema=False); the objective's description picks the sampler family and
config.sampling the method, grid, steps, guidance and classes (sampling.build).
"""
import os

import jax
import numpy as np

from kdiff_jax import config as config_lib, console, images, parallel, sampling, state, viewing


def generate(config, workdir: str, step=None) -> str:
  """Sample config.sampling.num_samples images from the checkpoint in workdir; return the .npz path."""
  config_lib.validate(config)
  mesh = parallel.make_mesh(config.mesh)
  weights = state.Weights(config, mesh)
  sampling_config = config.sampling
  params, step = weights.restore(workdir, use_ema=sampling_config.use_ema, step=step)
  console.info("sample: step %d of %s (%s weights), %s %d steps, guidance %g", step, workdir,
               "EMA" if sampling_config.use_ema else "raw", sampling_config.method,
               sampling_config.num_steps, sampling_config.guidance_scale)
  labels = sampling.cycling_labels(sampling_config.num_samples, sampling.classes(config))
  sample = sampling.build(config, weights.objective.description, weights.model.apply)
  samples = np.asarray(sampling.make_sampler(config, sample, mesh, labels)(
      params, jax.random.key(sampling_config.seed)))

  name = (f"samples_step{step}_{sampling_config.method}_{sampling_config.num_steps}steps"
          f"_w{sampling_config.guidance_scale:g}")
  path = os.path.join(workdir, name + ".npz")
  if jax.process_index() == 0:
    np.savez(path, images=samples, uint8=images.to_uint8(samples), labels=labels)
    shown = viewing.viewable(config, samples[:sampling_config.grid_size**2])
    images.save_grid(shown, os.path.join(workdir, name + ".png"))
  console.info("sample: wrote %d samples to %s (grid: %s.png)", len(samples), path, name)
  return path

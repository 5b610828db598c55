"""Samples as images a person can look at: a latent model's samples decoded by the VAE.

Used where samples become PNGs (the training loop's sample grids, as built by
evaluate.training_actions, and --mode=sample); kept apart from the loop so that the trainer
never imports the VAE.
"""
import numpy as np

from kdiff_jax.data import latents
from kdiff_jax.export import weight_files


def viewable(config, samples) -> np.ndarray:
  """Samples as images in about [-1, 1]: latents unnormalized and decoded by the VAE.

  Latents (data.name = 'latents', or per-channel latent statistics as an imported IMM model
  carries) with data.vae_path: the VAE decoder's images; without a VAE: the first three latent
  channels; any other data: the samples themselves.
  """
  samples = np.asarray(samples, np.float32)
  if config.data.name != "latents" and not config.data.latent_channel_mean:
    return samples
  if not config.data.vae_path:
    return samples[..., :3]
  decode, params = weight_files.vae_decoder(config.data.vae_path)
  return np.asarray(decode(params, latents.unnormalize(samples, config.data)))

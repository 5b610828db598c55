"""The built-in CPU demo: class-conditional flow matching on scikit-learn's 8x8 digits.

A tiny DiT-T/2 (0.2M parameters; patch 2 on 8x8 -> 16 tokens), rectified-flow velocity objective, Heun sampling
with mild guidance. Finishes in about a minute on 2 CPU cores and needs no download.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "digits"
  config.data.image_size = 8
  config.data.channels = 1
  config.data.num_classes = 10

  config.model.size = "T"
  config.model.patch_size = 2

  config.objective.time_sampling = "logit_normal"

  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.lr_schedule = "cosine"

  config.training.batch_size = 128
  config.training.num_steps = 1500
  config.training.ema_decays = (0.995,)  # short run: an EMA that forgets the init (0.995^1500 < 0.1%)
  config.training.log_every = 100
  config.training.sample_every = 500
  config.training.checkpoint_every = 500

  config.sampling.method = "heun"
  config.sampling.num_steps = 16
  config.sampling.guidance_scale = 2.0
  config.sampling.grid_size = 10
  return config

"""CPU demo: class-conditional MeanFlow on scikit-learn's 8x8 digits, sampled in one step.

A tiny DiT (XS, patch 4 on 8x8 -> 4 tokens: cheap on CPU) whose second time embedder reads
h = t - r, both embedders on the raw t in [0, 1] (model.time_scale = 1), and MeanFlow's
training recipe as in its official default config: (t, r) logit-normal(-0.4, 1), 75% of rows
with r = t, guidance in training with omega = 1, kappa = 0.5 (sampled as scale
omega/(1 - kappa) = 2), 10% labels dropped, adaptive weight p = 1, c = 0.01, Adam beta2 0.95.
The learning rate, schedule, steps and EMA are the other digits demos'. One-step samples:
python main.py --config=configs/meanflow_digits.py --workdir=/tmp/meanflow_digits
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "digits"
  config.data.image_size = 8
  config.data.channels = 1
  config.data.num_classes = 10

  config.model.size = "XS"
  config.model.patch_size = 4
  config.model.second_time_embedder = True  # h = t - r
  config.model.time_scale = 1.0             # MeanFlow embeds the raw t and h

  config.objective.name = "meanflow"
  config.objective.schedule = "rectified_flow"
  config.objective.time_sampling = "logit_normal"
  config.objective.logit_normal_mean = -0.4
  config.objective.logit_normal_std = 1.0
  config.objective.label_dropout = 0.1
  config.objective.meanflow.share_r_equals_t = 0.75
  config.objective.meanflow.omega = 1.0
  config.objective.meanflow.kappa = 0.5
  config.objective.meanflow.guidance_interval = (0.0, 1.0)
  config.objective.meanflow.adaptive_p = 1.0
  config.objective.meanflow.adaptive_c = 0.01

  config.optimizer.learning_rate = 1e-3
  config.optimizer.b2 = 0.95
  config.optimizer.warmup_steps = 100
  config.optimizer.lr_schedule = "cosine"

  config.training.batch_size = 128
  config.training.num_steps = 1500
  config.training.ema_decays = (0.995,)  # short run: an EMA that forgets the init
  config.training.log_every = 100
  config.training.sample_every = 500
  config.training.checkpoint_every = 500

  config.sampling.method = "mean_flow"
  config.sampling.grid = "uniform_t"
  config.sampling.num_steps = 1
  config.sampling.grid_size = 10
  return config

"""CPU demo: class-conditional improved MeanFlow (iMF) on scikit-learn's 8x8 digits, sampled in
one step with guidance as a network input.

A tiny in-context iMF DiT (size XS: width 96, 2 shared blocks, a 1-block u head and a 1-block v
head; patch 4 on 8x8 -> 4 patch tokens after the 20 condition tokens) and iMF's training recipe
as in its official config: (t, r) logit-normal(-0.4, 1), half the rows with r = t, omega drawn
on [1, 8] (s_max 7, cfg_beta 1) with a random guidance interval, 10% labels dropped, the v-loss
with the auxiliary v head, adaptive weight p = 1, c = 0.01, Adam beta2 0.95. The learning rate,
schedule, batch and EMA are the other digits demos', with 750 steps. One-step samples at
omega = 3 on the whole interval [0, 1]:
python main.py --config=configs/imf_digits.py --workdir=/tmp/imf_digits
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "digits"
  config.data.image_size = 8
  config.data.channels = 1
  config.data.num_classes = 10

  config.model.name = "imf_dit"
  config.model.size = "XS"
  config.model.patch_size = 4
  config.model.second_time_embedder = True  # h = t - r, the network's only time input
  config.model.time_scale = 1.0             # iMF embeds the raw h, 1 - 1/omega and interval

  config.objective.name = "imf"
  config.objective.schedule = "rectified_flow"
  config.objective.time_sampling = "logit_normal"
  config.objective.logit_normal_mean = -0.4
  config.objective.logit_normal_std = 1.0
  config.objective.label_dropout = 0.1
  config.objective.imf.share_r_equals_t = 0.5
  config.objective.imf.adaptive_p = 1.0
  config.objective.imf.adaptive_c = 0.01
  config.objective.imf.s_max = 7.0
  config.objective.imf.cfg_beta = 1.0
  config.objective.imf.interval_split = 0.5
  config.objective.imf.aux_v_head = True

  config.optimizer.learning_rate = 1e-3
  config.optimizer.b2 = 0.95
  config.optimizer.warmup_steps = 100
  config.optimizer.lr_schedule = "cosine"

  config.training.batch_size = 128
  config.training.num_steps = 750
  config.training.ema_decays = (0.995,)  # short run: an EMA that forgets the init
  config.training.log_every = 100
  config.training.sample_every = 250
  config.training.checkpoint_every = 250

  config.sampling.method = "mean_flow"
  config.sampling.grid = "uniform_t"
  config.sampling.num_steps = 1
  config.sampling.guidance_scale = 3.0
  config.sampling.guidance_interval = (0.0, 1.0)
  config.sampling.grid_size = 10
  return config

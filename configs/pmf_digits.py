"""CPU demo: class-conditional pixel MeanFlow (pMF) on scikit-learn's 8x8 digits, sampled in one
step with guidance as a network input.

A tiny pMF DiT (model.name 'pmf_dit', size XS: width 96, 3 blocks of which the last is duplicated
into the u and v heads, a 32-wide bottleneck patch embedding; patch 4 on 8x8 -> 4 patch tokens)
whose heads predict x and return u = (z - x̂_u)/clip(t, 0.05, 1), v likewise. pMF's loss as in
its official code (Lyy-iiis/pMF `pmf.py`, `configs/default.py`, `configs/pMF_B_16_config.yml`):
(t, r) logit-normal with the B/16 recipe's P_mean = P_std = 0.8 drawn, then r = t on half the
rows, then ordered (the default -0.4, 1 put too few rows near t = 1: 1-step accuracy 0.54 at
500 steps, against 0.998 with 0.8, 0.8 at 600); the target v_t = (z_t - x)/clip(t, 0.05, 1);
omega on [1, 8] (s_max 7, cfg_beta 1) with a random guidance interval; 10% labels dropped; the
u and v losses with adaptive weight p = 1, c = 0.01. The perceptual losses are off (8x8 digits
are below what LPIPS and ConvNeXt read). Adam b2 0.95 as the other digits demos (the official
Muon is for the ImageNet configs); 600 steps. One-step samples at omega = 3 on the whole
interval:
python main.py --config=configs/pmf_digits.py --workdir=/tmp/pmf_digits
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "digits"
  config.data.image_size = 8
  config.data.channels = 1
  config.data.num_classes = 10

  config.model.name = "pmf_dit"
  config.model.size = "XS"
  config.model.patch_size = 4
  config.model.second_time_embedder = True  # h = t - r, the network's only embedded time
  config.model.time_scale = 1.0             # raw h, 1 - 1/omega and interval in the embedders
  config.model.prediction = "x"
  config.model.t_floor = 0.05

  config.objective.name = "pmf"
  config.objective.schedule = "rectified_flow"
  config.objective.time_sampling = "logit_normal"
  config.objective.logit_normal_mean = 0.8  # pMF's P_mean, P_std (pMF_B_16_config.yml)
  config.objective.logit_normal_std = 0.8
  config.objective.noise_std = 1.0           # pMF's noise_scale
  config.objective.label_dropout = 0.1
  config.objective.pmf.share_r_equals_t = 0.5
  config.objective.pmf.adaptive_p = 1.0
  config.objective.pmf.adaptive_c = 0.01
  config.objective.pmf.s_max = 7.0
  config.objective.pmf.cfg_beta = 1.0
  config.objective.pmf.interval_split = 0.5
  config.objective.pmf.lpips_weight = 0.0
  config.objective.pmf.convnext_weight = 0.0

  config.optimizer.learning_rate = 1e-3
  config.optimizer.b2 = 0.95
  config.optimizer.warmup_steps = 100
  config.optimizer.lr_schedule = "cosine"

  config.training.batch_size = 128
  config.training.num_steps = 600
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

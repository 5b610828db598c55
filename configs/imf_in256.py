"""Improved MeanFlow (iMF) on ImageNet 256x256: iMF-XL/2 on 32x32x4 SD-VAE latents.

The official recipe (Lyy-iiis/imeanflow `configs/default.py`, `configs/train_config.yml`,
`imf.py`, `models/imfDiT.py`; paper: FID 1.72 at 1 NFE, 1.54 at 2 NFE):
* network: imfDiT_XL_2 (model.name 'imf_dit', size XL: depth 48 = 40 shared blocks + an 8-block
  u head, and an 8-block v head; width 1024, 16 heads, SwiGLU 2730; 610M parameters without the
  v head, 711M with it); the raw h, 1 - 1/omega and interval in the embedders (time_scale 1).
  The official code runs in float32 (training.half_precision False); here bfloat16 compute
  with float32 parameters and loss, as the other in256 configs.
* loss (default.py, imf.py): (t, r) logit-normal(-0.4, 1), data_proportion 0.5 (half the rows
  r = t), omega on [1, 8] (s_max 7, cfg_beta 1), t_min ~ U[0, 0.5], t_max ~ U[0.5, 1],
  class_dropout_prob 0.1, norm_p 1, norm_eps 0.01, the auxiliary v head.
* optimizer (train_config.yml): Adam (optax.adamw, weight decay 0) lr 1e-4, b2 0.95, 10 warm-up
  epochs then constant (warmup_const); EMA 0.9999 (ema_type const).
* training: batch 1024, 640 epochs of 1251 steps (1,281,167 images / 1024), random flips.
* latents (utils/vae_util.py): sd-vae-ft-mse, normalised per channel by IMM's statistics
  (data.latents.IMM_IMAGENET_STATS) with final scale 1 (no 0.5).
* sampling (configs/eval_config.yml), z <- z - (t - r)·u on linspace(1, 0, N + 1), omega and
  the interval network inputs:
    1 NFE, XL/2: sampling.guidance_scale 8.0, sampling.guidance_interval (0.42, 0.62)  (this file)
    2 NFE, XL/2: guidance_scale 4.0, guidance_interval (0.36, 0.64)
    1 NFE, M/2 and L/2: guidance_scale 10.5, guidance_interval (0.4, 0.6)
    1 NFE, B/2: guidance_scale 8.0, guidance_interval (0.4, 0.65)
  (10.5 is above the training range [1, 8]: the official eval uses it for M/2 and L/2, so raise
  objective.imf.s_max to 9.5 for those settings, or this config refuses them.)

  python main.py --config=configs/imf_in256.py --config.data.latents_path=$LATENTS --workdir=$WORKDIR
"""
from configs import default
from kdiff_jax.data import latents

STEPS_PER_EPOCH = 1251  # 1,281,167 ImageNet training images / batch 1024


def get_config():
  config = default.get_config()
  config.data.name = "latents"
  config.data.image_size = 32
  config.data.channels = 4
  config.data.num_classes = 1000
  config.data.update(latents.IMM_IMAGENET_STATS)
  config.data.latent_scale = 1.0            # (latent - mean)/std, no further scale
  config.data.random_flip = True

  config.model.name = "imf_dit"
  config.model.size = "XL"
  config.model.patch_size = 2
  config.model.second_time_embedder = True  # h = t - r
  config.model.time_scale = 1.0
  config.model.compute_dtype = "bfloat16"
  config.model.remat = "full"
  config.model.scan_blocks = True

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

  config.optimizer.learning_rate = 1e-4
  config.optimizer.lr_schedule = "constant"
  config.optimizer.warmup_steps = 10 * STEPS_PER_EPOCH
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.95
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 0.0

  config.training.batch_size = 1024
  config.training.num_steps = 640 * STEPS_PER_EPOCH
  config.training.ema_decays = (0.9999,)
  config.training.log_every = 100
  config.training.sample_every = 20 * STEPS_PER_EPOCH
  config.training.checkpoint_every = 20 * STEPS_PER_EPOCH

  config.sampling.method = "mean_flow"
  config.sampling.grid = "uniform_t"
  config.sampling.num_steps = 1
  config.sampling.guidance_scale = 8.0
  config.sampling.guidance_interval = (0.42, 0.62)

  # FSDP over every device. On a v5p-128 prefer --config.mesh.data=4 --config.mesh.fsdp=16:
  # libtpu runs an all-gather or reduce-scatter over all 64 chips (a 3-D group of the 4x4x4
  # torus) as an all-reduce, twice the bytes, while fsdp groups of 16 (a 4x4 plane) keep them
  # native; the state per chip grows 4x, still under 1 GB (benchmarks/RESULTS.md, "Pod figures
  # as the chip runs them").
  config.mesh.data = 1
  config.mesh.fsdp = -1
  return config

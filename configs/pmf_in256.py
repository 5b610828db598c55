"""Pixel MeanFlow (pMF) on ImageNet 256x256 pixels: pMF-B/16, no VAE (FID 3.12 at 1 NFE).

The official recipe (Lyy-iiis/pMF `configs/default.py`, `configs/pMF_B_16_config.yml`,
`configs/eval_config.yml`, `pmf.py`, `models/pmfDiT.py`; paper arXiv 2601.22158):
* network: pmfDiT_B_16 (model.name 'pmf_dit', size B, patch 16: 256 patch tokens after the
  in-context condition tokens, JiT's bottleneck patch embedding; the u and v heads predict x and
  are converted to velocities with clip(t, 0.05, 1)). The official code runs in float32; here
  bfloat16 compute with float32 parameters and loss, as the other in256 configs.
* loss (default.py, pMF_B_16_config.yml, pmf.py): (t, r) logit-normal with P_mean 0.8, P_std 0.8
  (objective.logit_normal_mean / std), data_proportion 0.5 (objective.pmf.share_r_equals_t),
  noise_scale 1.0 (objective.noise_std), omega on [1, 8) (cfg_max 7, cfg_beta 1),
  t_min ~ U[0, 0.5], t_max ~ U[0.5, 1], class_dropout_prob 0.1, norm_p 1, norm_eps 0.01;
  perceptual terms on rows with t < 0.8: LPIPS-VGG16 x 0.4 and ConvNeXt-V2 x 0.1 on one
  random resized 224 crop (utils/auxloss_util.py).
* optimizer (pMF_B_16_config.yml): Muon (optax.contrib.muon) lr 1e-3, Adam b2 0.95 for the
  parameters that are not matrices, no warm-up, constant rate; EMA 'edm' with half-lives 500,
  1000 and 2000 kimg (the evaluation picks 2000).
* training: batch 1024, 320 epochs of 1251 steps (1,281,167 images / 1024), no flips (the
  official pipeline's use_flip is False), images scaled to [-1, 1].
* sampling (eval_config.yml, pMF_B_16_config.yml): one step z <- z - (t - r)·u from t = 1 to 0,
  omega 8.5 on the interval [0.1, 0.7], the EMA of half-life 2000 kimg. The official evaluation
  samples omega = 8.5 above the trained range [1, 8): pMF's description accepts any omega >= 1
  (objectives/pmf.py). Other released settings: B/32 omega 6.5 [0.1, 0.7]; L/16 omega 7.0
  [0.2, 0.7] (EMA 1000); L/32 omega 7.5 [0.2, 0.6].

Slice: batch 1024 fits a v5p-32 (v5p:2x2x4, 16 chips, data parallel) at 61 GB per chip; 8 chips
would need 98.6 GB (benchmarks/RESULTS.md, "pMF on TPU slices").

The perceptual terms read the user's weight files (docs/perceptual.md; nothing is downloaded):

  python main.py --config=configs/pmf_in256.py --workdir=$WORKDIR \
    --config.perceptual.lpips_vgg16=$VGG16_PTH --config.perceptual.lpips_heads=$LPIPS_VGG_PTH \
    --config.perceptual.convnext=$CONVNEXTV2_BASE_22K_224_DIR
"""
from configs import default

STEPS_PER_EPOCH = 1251  # 1,281,167 ImageNet training images / batch 1024


def get_config():
  config = default.get_config()
  config.data.name = "tfds"
  config.data.tfds_name = "imagenet2012"
  config.data.tfds_split = "train"
  config.data.image_size = 256
  config.data.channels = 3
  config.data.num_classes = 1000
  config.data.random_flip = False

  config.model.name = "pmf_dit"
  config.model.size = "B"
  config.model.patch_size = 16
  config.model.second_time_embedder = True  # h = t - r
  config.model.time_scale = 1.0
  config.model.prediction = "x"
  config.model.t_floor = 0.05
  config.model.compute_dtype = "bfloat16"

  config.objective.name = "pmf"
  config.objective.schedule = "rectified_flow"
  config.objective.time_sampling = "logit_normal"
  config.objective.logit_normal_mean = 0.8  # P_mean
  config.objective.logit_normal_std = 0.8   # P_std
  config.objective.noise_std = 1.0          # noise_scale
  config.objective.label_dropout = 0.1
  config.objective.pmf.share_r_equals_t = 0.5
  config.objective.pmf.adaptive_p = 1.0
  config.objective.pmf.adaptive_c = 0.01
  config.objective.pmf.s_max = 7.0
  config.objective.pmf.cfg_beta = 1.0
  config.objective.pmf.interval_split = 0.5
  config.objective.pmf.tr_uniform = False
  config.objective.pmf.lpips_weight = 0.4
  config.objective.pmf.convnext_weight = 0.1
  config.objective.pmf.perceptual_max_t = 0.8

  config.optimizer.name = "muon"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.lr_schedule = "constant"
  config.optimizer.warmup_steps = 0
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.95
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 0.0

  config.training.batch_size = 1024
  config.training.num_steps = 320 * STEPS_PER_EPOCH
  config.training.ema_decays = ()
  config.training.ema_halflives_kimg = (500.0, 1000.0, 2000.0)
  config.training.log_every = 100
  config.training.sample_every = 5 * STEPS_PER_EPOCH
  config.training.checkpoint_every = 20 * STEPS_PER_EPOCH

  config.sampling.method = "mean_flow"
  config.sampling.grid = "uniform_t"
  config.sampling.num_steps = 1
  config.sampling.guidance_scale = 8.5
  config.sampling.guidance_interval = (0.1, 0.7)
  config.sampling.ema_halflife_kimg = 2000.0
  return config

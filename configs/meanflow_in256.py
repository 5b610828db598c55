"""MeanFlow on ImageNet 256x256 latents: DiT-XL/2 on 32x32x4 SD-VAE latents, one-step sampling.

Geng, Deng, Bai, Kolter, He 2025 (docs/objectives/meanflow.md), the paper's ImageNet recipe
(its appendix configuration table and the official Gsunshine/meanflow configs/default.py):
  batch 256, Adam lr 1e-4 with beta2 0.95, no weight decay, constant rate     (default.py)
  EMA 0.9999, 240 epochs                                                      (default.py; table)
  (t, r) logit-normal(-0.4, 1.0), 25% of rows with r != t                     (default.py; table)
  adaptive weight p = 1.0, c = 0.01; 10% labels dropped                        (default.py)
  XL/2 guidance in training: omega 0.2, kappa 0.92 on t in [0, 0.75], an      (the paper's table
    effective scale omega/(1 - kappa) = 2.5                                      for XL/2)
  DiT embedders on the raw t and h = t - r (no x1000), plain softmax attention (models_dit.py)
  SD-VAE (ft-mse in the official code) latents x0.18215; sampling 1 step from t = 1 to 0, no CFG
Reported: FID 3.43 at 1 NFE, 2.93 at 2 NFE. The guidance numbers of the table were read from
the paper, not from a released XL/2 config (the official repository ships the B/4 one).

  python main.py --config=configs/meanflow_in256.py --config.data.latents_path=$LATENTS --workdir=$WORKDIR

Computes in bfloat16 with float32 weights (the official code runs float32; the JVP goes through
plain XLA attention either way). Compiled for TPU slices by benchmarks/tpu_aot.py (see
benchmarks/RESULTS.md).
"""
from configs import default

STEPS_PER_EPOCH = 5005  # 1,281,167 ImageNet training images / batch 256


def get_config():
  config = default.get_config()
  config.data.name = "latents"
  config.data.image_size = 32
  config.data.channels = 4
  config.data.num_classes = 1000
  config.data.latent_scale = 0.18215
  config.data.random_flip = True

  config.model.name = "dit"
  config.model.size = "XL"
  config.model.patch_size = 2
  config.model.second_time_embedder = True  # h = t - r
  config.model.time_scale = 1.0
  config.model.compute_dtype = "bfloat16"

  config.objective.name = "meanflow"
  config.objective.schedule = "rectified_flow"
  config.objective.time_sampling = "logit_normal"
  config.objective.logit_normal_mean = -0.4
  config.objective.logit_normal_std = 1.0
  config.objective.noise_std = 1.0
  config.objective.label_dropout = 0.1
  config.objective.meanflow.share_r_equals_t = 0.75
  config.objective.meanflow.omega = 0.2
  config.objective.meanflow.kappa = 0.92
  config.objective.meanflow.guidance_interval = (0.0, 0.75)
  config.objective.meanflow.adaptive_p = 1.0
  config.objective.meanflow.adaptive_c = 0.01

  config.optimizer.learning_rate = 1e-4
  config.optimizer.lr_schedule = "constant"
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.95
  config.optimizer.weight_decay = 0.0

  config.training.batch_size = 256
  config.training.num_steps = 240 * STEPS_PER_EPOCH
  config.training.ema_decays = (0.9999,)
  config.training.log_every = 100
  config.training.sample_every = 10_000
  config.training.checkpoint_every = 10_000

  config.sampling.method = "mean_flow"
  config.sampling.num_steps = 1
  return config

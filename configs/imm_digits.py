"""CPU demo: class-conditional IMM on scikit-learn's 8x8 digits, sampled in 1-8 steps.

A tiny DiT (XS, patch 4 on 8x8 -> 4 tokens: cheap on CPU) with a second time embedder for s,
the ImageNet recipe's map (euler_fm on rectified flow, sigma_d = 0.5, T = 0.994, M = 4, k = 12, Laplace
kernel, a = 1, b = 4), pushforward sampling on a uniform grid with guidance. About 1.5 minutes on
2 CPU cores, no download: python main.py --config=configs/imm_digits.py --workdir=/tmp/imm_digits
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
  config.model.second_time_embedder = True

  config.objective.name = "imm"
  config.objective.noise_std = 0.5      # sigma_d
  config.objective.t_min = 0.0          # eps
  config.objective.t_max = 0.994        # T
  config.objective.imm.group_size = 4
  config.objective.imm.k = 12
  config.objective.imm.f_type = "euler_fm"
  config.objective.imm.kernel = "laplace"
  config.objective.imm.a = 1.0
  config.objective.imm.b = 4.0

  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.lr_schedule = "cosine"

  config.training.batch_size = 128
  config.training.num_steps = 1500
  config.training.ema_decays = (0.995,)  # short run: an EMA that forgets the init
  config.training.log_every = 100
  config.training.sample_every = 500
  config.training.checkpoint_every = 500

  config.sampling.method = "pushforward"
  config.sampling.grid = "uniform_t"
  config.sampling.num_steps = 4
  config.sampling.t_start = 0.994       # T
  config.sampling.t_end = 0.0           # eps
  config.sampling.guidance_scale = 1.5
  config.sampling.grid_size = 10
  return config

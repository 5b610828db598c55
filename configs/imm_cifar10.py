"""IMM on CIFAR-10 pixels (Zhou, Ermon, Song 2025; docs/objectives/imm.md) with the paper's DDPM++ U-Net.

The released model (lumalabs/imm configs/cifar10_generate_images.yaml): EDM's SongUNet in its
DDPM++ form (128 channels, multipliers [2, 2, 2], 4 blocks per level, attention at 16x16,
positional time embedding, resample filter [1, 1], dropout 0.2) with IMM's second time
embedding, unconditional; 56,061,443 parameters (models/unet.py, model.size 'ddpmpp').
The recipe: rectified flow, sigma_d = 0.5, [eps, T] = [0.006, 0.994], the simple_edm map,
identity time conditioning (the second embedding sees 1000·s), Laplace kernel, M = 4, k = 15,
a = 1, b = 5, float32; pixels x/127.5 - 1. Sampling: pushforward on the paper's CIFAR grids,
[0.994, 0.006] (1 step, FID 3.20) and [0.994, 0.5833 (eta = 1.4), 0.006] (2 steps, FID 1.98).

Unconditional, as the paper's model: data.num_classes = 0, so CIFAR's labels are not used, the
network has no label input and sampling runs without guidance (w = 1).

Differences from the paper, said plainly:
* optimizer: AdamW with the paper's lr / betas / eps (the trainer has no RAdam).

configs/imm_cifar10_dit.py is the same recipe with a DiT-B/2 backbone.

  python main.py --config=configs/imm_cifar10.py --workdir=$WORKDIR
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "tfds"
  config.data.tfds_name = "cifar10"
  config.data.image_size = 32
  config.data.channels = 3
  config.data.num_classes = 0               # unconditional: no label embedding, no guidance
  config.data.random_flip = True

  config.model.name = "unet"
  config.model.size = "ddpmpp"
  config.model.patch_size = 1
  config.model.second_time_embedder = True
  config.model.dropout = 0.2

  config.objective.name = "imm"
  config.objective.schedule = "rectified_flow"
  config.objective.noise_std = 0.5          # sigma_d
  config.objective.t_min = 0.006            # eps
  config.objective.t_max = 0.994            # T
  config.objective.label_dropout = 0.0      # unconditional: no null label to learn
  config.objective.imm.group_size = 4
  config.objective.imm.k = 15
  config.objective.imm.delta = 0.0
  config.objective.imm.f_type = "simple_edm"
  config.objective.imm.kernel = "laplace"
  config.objective.imm.a = 1.0
  config.objective.imm.b = 5.0
  config.objective.imm.time_conditioning = "identity"

  config.optimizer.learning_rate = 1e-4
  config.optimizer.lr_schedule = "constant"
  config.optimizer.warmup_steps = 0
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 0.0

  config.training.batch_size = 4096
  config.training.num_steps = 400_000
  config.training.ema_decays = (0.9999,)
  config.training.log_every = 100
  config.training.sample_every = 10_000
  config.training.checkpoint_every = 10_000

  config.sampling.method = "pushforward"
  config.sampling.grid = "cifar"
  config.sampling.num_steps = 2
  config.sampling.t_start = 0.994
  config.sampling.t_end = 0.006
  config.sampling.guidance_scale = 1.0
  return config

"""IMM on ImageNet 256x256: DiT-XL/2 on 32x32x4 SD-VAE latents, the paper's 1.99-FID recipe.

Zhou, Ermon, Song 2025 (docs/objectives/imm.md): rectified flow with sigma_d = 0.5, T = 0.994, eps = 0;
euler_fm map, Laplace kernel, M = 4 particles per group, k = 12; stride conditioning (the
second time embedder sees t - s) with a = 2, b = 4 and a minimum gap Delta = 1e-4 for
low-precision (bf16) compute, the target pass in float32. AdamW lr 1e-4, (0.9, 0.999),
eps 1e-8, no weight decay, warm-up or clipping; batch 4096; EMA 0.9999; 1.2M steps.
Sampling: pushforward on the uniform grid linspace(T, 0, N + 1), N = 1 | 2 | 4 | 8
(--config.sampling.num_steps), guidance w = 1.5 at every step (paper FID 8.05 / 3.99 / 2.51 / 1.99).

Latents: SD-VAE (stabilityai/sd-vae-ft-ema) posteriors as data.latents_path/{mean,std,labels}.npy,
sampled per read and normalised per channel (z - mean)/std·0.5.

  python main.py --config=configs/imm_in256.py --config.data.latents_path=$LATENTS --workdir=$WORKDIR
"""
from configs import default
from kdiff_jax.data import latents


def get_config():
  config = default.get_config()
  config.data.name = "latents"
  config.data.image_size = 32
  config.data.channels = 4
  config.data.num_classes = 1000
  config.data.update(latents.IMM_IMAGENET_STATS)   # per-channel (z - mean)/std·0.5

  config.model.size = "XL"
  config.model.patch_size = 2
  config.model.second_time_embedder = True
  config.model.compute_dtype = "bfloat16"   # time embeddings and the IMM loss stay float32

  config.objective.name = "imm"
  config.objective.schedule = "rectified_flow"
  config.objective.noise_std = 0.5          # sigma_d
  config.objective.t_min = 0.0              # eps
  config.objective.t_max = 0.994            # T: eta(T) = 165.67
  config.objective.label_dropout = 0.1
  config.objective.imm.group_size = 4
  config.objective.imm.k = 12
  config.objective.imm.delta = 1e-4
  config.objective.imm.f_type = "euler_fm"
  config.objective.imm.kernel = "laplace"
  config.objective.imm.a = 2.0
  config.objective.imm.b = 4.0
  config.objective.imm.time_conditioning = "stride"
  config.objective.imm.target_full_precision = True

  config.optimizer.learning_rate = 1e-4
  config.optimizer.lr_schedule = "constant"
  config.optimizer.warmup_steps = 0
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 0.0

  config.training.batch_size = 4096
  config.training.num_steps = 1_200_000
  config.training.ema_decays = (0.9999,)
  config.training.log_every = 100
  config.training.sample_every = 10_000
  config.training.checkpoint_every = 10_000

  config.sampling.method = "pushforward"
  config.sampling.grid = "uniform_t"
  config.sampling.num_steps = 8
  config.sampling.t_start = 0.994
  config.sampling.t_end = 0.0
  config.sampling.guidance_scale = 1.5

  # FSDP over every device (parameters, Adam moments and EMA sharded; the batch splits over
  # data x fsdp either way). Compiled for real slices by benchmarks/tpu_aot.py
  # (benchmarks/RESULTS.md): v5p-128 (v5p:4x4x4) fits as configured, 27 GB of 95 per chip (14 GB
  # with --config.model.remat=dots; 57 GB with --config.model.scan_blocks=true, which keeps
  # every block's activations, 13 GB with both, up to batch 32768). v5e-256 needs
  # --config.mesh.data=2 --config.mesh.fsdp=128 (DiT-XL's 1152 and 3456 do not divide 256, and
  # the start-up check refuses to replicate them): then 6.8 GB of 16. v4-32 does not fit batch
  # 4096 (256 images per chip ask 73 GB, 43 GB with remat, of 30.75): with remat it takes 2816;
  # use a larger v4 slice.
  # FSDP over every device. On a v5p-128 prefer --config.mesh.data=4 --config.mesh.fsdp=16:
  # libtpu runs an all-gather or reduce-scatter over all 64 chips (a 3-D group of the 4x4x4
  # torus) as an all-reduce, twice the bytes, while fsdp groups of 16 (a 4x4 plane) keep them
  # native; the state per chip grows 4x, still under 1 GB (benchmarks/RESULTS.md, "Pod figures
  # as the chip runs them").
  config.mesh.data = 1
  config.mesh.fsdp = -1
  return config

"""Terminal Velocity Matching on ImageNet 512x512: DiT-XL/2 (18 heads) on 64x64x4 SD-VAE latents.

The official im512_w2p5 recipe (lumalabs/tvm `configs/im512_w2p5.yaml`; its released
`im512_w2p5.pkl`: FID 4.32 at 1 step, cfg 2.5), which differs from im256_w2 (configs/tvm_in256.py,
whose settings this config starts from) in:
* latents (yaml encoder): 512x512 images, so 64x64x4 latents and 1024 tokens at patch 2; the
  per-channel statistics raw_mean [1.56, -0.695, 0.483, 0.729], raw_std [5.27, 5.91, 4.21,
  4.31], final_std 1.0 (data.latent_scale = 1);
* network: do_scale_param false (objective.tvm.scale_output = False: the velocity is F, not
  cfg·F);
* loss: cfg 2.5 (fixed);
* training: max_grad_norm 1.0 (optimizer.grad_clip_norm);
* sampling (yaml sampling, generate_images.py): linspace(1, 0, N + 1), N = 1 | 2 | 4, cfg 2.5;
  the released file is evaluated at 1 step.
Unchanged from im256_w2: XL/2 with 18 heads, qk_norm, do_mod_norm, learn_guidance, RMSNorm without
affine, spectral init with the embedders at normal(0.02) (the yaml's time_specinit never reaches
the DiT, see tvm_in256), the raw t, t - s and beta in the embedders; the draws (s_P_mean -0.4,
s_P_std 1, gap_P_mean -0.8, gap_P_std 1), label_dropout 0.1; AdamW lr 1e-4, betas (0.9, 0.95),
eps 1e-8, no decay; batch 2048, ema_beta 0.9999, ema_target_beta 0.99; bf16.

The JVP runs 1024 tokens through plain XLA attention (the authors wrote Triton kernels for it);
what it costs on a TPU slice: benchmarks/RESULTS.md, "TVM at 512".

  python main.py --config=configs/tvm_in512.py --config.data.latents_path=$LATENTS --workdir=$WORKDIR
"""
from configs import tvm_in256
from kdiff_jax.data import latents


def get_config():
  config = tvm_in256.get_config()
  config.data.image_size = 64               # 512 / 8: the SD-VAE's latents
  config.data.update(latents.TVM_IMAGENET512_STATS)

  config.objective.tvm.cfg = 2.5
  config.objective.tvm.scale_output = False  # do_scale_param false

  config.optimizer.grad_clip_norm = 1.0      # max_grad_norm

  # Full remat over scanned blocks: with 1024 tokens the 'dots' policy's saved matmul outputs
  # (qkv, fc1, ... of all 28 blocks, for the JVP's primal and tangent) need 112 GB per chip at
  # 32 images per chip; recomputing each block holds batch 2048 in 81 GB per chip on a v5p-32
  # (16 chips) and 23 GB on a v5p-128 (benchmarks/RESULTS.md, "TVM at 512").
  config.model.remat = "full"
  config.model.scan_blocks = True

  config.sampling.num_steps = 1
  config.sampling.guidance_scale = 2.5       # cfg_scale
  return config

"""Pixel MeanFlow (pMF) on ImageNet 512x512 pixels: pMF-B/32 (FID 3.70 at 1 NFE).

configs/pmf_in256.py at 512 pixels, as the official pMF_B_32_config.yml differs from the B/16
one (Lyy-iiis/pMF): patch 32 (the same 256 patch tokens), noise_scale 2.0
(objective.noise_std: the sampler starts from 2·N(0, I) too), and the released B/32 checkpoint's
sampling settings (eval_config.yml): omega 6.5 on [0.1, 0.7], one step, the EMA of half-life
2000 kimg. Everything else (loss, perceptual terms, Muon lr 1e-3, EDM EMA half-lives 500, 1000,
2000 kimg, batch 1024, 320 epochs) is the B/16 recipe's.

  python main.py --config=configs/pmf_in512.py --workdir=$WORKDIR
"""
from configs import pmf_in256


def get_config():
  config = pmf_in256.get_config()
  config.data.image_size = 512
  config.model.patch_size = 32
  config.objective.noise_std = 2.0
  config.sampling.guidance_scale = 6.5
  config.sampling.guidance_interval = (0.1, 0.7)
  return config

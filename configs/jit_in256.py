"""JiT-B/16 x-prediction on ImageNet 256x256 pixels (Li & He 2025): the k-Diff pixel baseline.

configs/kdiff_in256_pixel.py with k fixed at 1: the network predicts x, scored as the velocity
(x_t - x_hat)/max(t, 0.05) against (n - x)·t/max(t, 0.05), which is JiT's loss
||x_hat - x||^2 / max(t, 0.05)^2 exactly (tests/test_kdiff.py). Only the target differs from
the k-Diff run (JiT reports FID 3.66 for B/16 at 600 epochs).
"""
from configs import kdiff_in256_pixel


def get_config():
  config = kdiff_in256_pixel.get_config()
  config.objective.kdiff.learnable = False
  config.objective.kdiff.k_init = 1.0
  return config

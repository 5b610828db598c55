"""v-prediction flow matching on ImageNet 256x256 latents: the k-Diff latent baseline.

configs/kdiff_in256_latent.py with k fixed at 1/2: the network predicts u = (x - n)/2, i.e.
minus half the rectified-flow velocity, and the loss is the velocity loss ||-2·u_hat - (n - x)||^2
(tests/test_kdiff.py checks loss and gradients against objective 'flow' with
prediction = 'velocity'). Only the target differs from the k-Diff run.
"""
from configs import kdiff_in256_latent


def get_config():
  config = kdiff_in256_latent.get_config()
  config.objective.kdiff.learnable = False
  config.objective.kdiff.k_init = 0.5
  return config

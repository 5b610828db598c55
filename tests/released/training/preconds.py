"""lumalabs/imm training/preconds.py's IMMPrecond, our stand-in (same attributes and maths).

cfg_forward(x, t, s, class_labels, cfg_scale): G = model(c_in·x, time_scale·t, time_scale·s or
time_scale·(t - s), one-hot labels), c_in = 1/(sigma_d·sqrt(alpha_t² + sigma_t²)); with
cfg_scale, G = G(zeros) + w·(G(labels) - G(zeros)); then the map f_{s,t} of f_type in float64.
`pushforward` is generate_images.py's pushforward_generator_fn on the uniform grid.
"""
import torch

from torch_utils import persistence
from training.dit import DiT  # noqa: F401  (IMMPrecond finds model_type in its globals)
from training.unets import SongUNet  # noqa: F401


@persistence.persistent_class
class IMMPrecond(torch.nn.Module):

  def __init__(self, img_resolution, img_channels, label_dim=0, mixed_precision=None,
               noise_schedule="fm", model_type="DiT", sigma_data=0.5, f_type="euler_fm",
               T=0.994, eps=0.0, temb_type="identity", time_scale=1000.0, **model_kwargs):
    super().__init__()
    self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
    self.noise_schedule, self.sigma_data, self.f_type = noise_schedule, sigma_data, f_type
    self.T, self.eps, self.temb_type, self.time_scale = T, eps, temb_type, time_scale
    self.model = globals()[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                       out_channels=img_channels, label_dim=label_dim,
                                       **model_kwargs)

  def get_alpha_sigma(self, t):
    if self.noise_schedule == "fm":
      return 1 - t, t
    return torch.cos(t * torch.pi / 2), torch.sin(t * torch.pi / 2)

  def cfg_forward(self, x, t, s, class_labels, cfg_scale=None):
    alpha_t, sigma_t = self.get_alpha_sigma(t)
    c_in = (alpha_t**2 + sigma_t**2).rsqrt() / self.sigma_data
    second = s if self.temb_type == "identity" else t - s
    noise_t = (t * self.time_scale).to(torch.float32).reshape(1)
    noise_s = (second * self.time_scale).to(torch.float32).reshape(1)
    x_in = (c_in * x).to(torch.float32)
    if cfg_scale is not None:
      out = self.model(torch.cat([x_in, x_in]), noise_t, noise_s,
                       torch.cat([torch.zeros_like(class_labels), class_labels]))
      uncond, cond = out.double().chunk(2)
      G = uncond + cfg_scale * (cond - uncond)
    else:
      G = self.model(x_in, noise_t, noise_s, class_labels).double()
    alpha_s, sigma_s = self.get_alpha_sigma(s)
    if self.f_type == "euler_fm":
      return x - (t - s) * self.sigma_data * G
    if self.f_type == "simple_edm":
      norm = alpha_t**2 + sigma_t**2
      return ((alpha_t * alpha_s + sigma_t * sigma_s) / norm * x
              - (alpha_s * sigma_t - alpha_t * sigma_s) * norm.rsqrt() * self.sigma_data * G)
    return (alpha_s - alpha_t * sigma_s / sigma_t) * G + sigma_s / sigma_t * x


@torch.no_grad()
def pushforward(net, latents, class_labels, num_steps, cfg_scale=None):
  """x <- f_{t_{i+1}, t_i}(x) on linspace(T, eps, N + 1), in float64 between network calls."""
  times = torch.linspace(net.T, net.eps, num_steps + 1, dtype=torch.float64)
  x = latents.to(torch.float64)
  for t, s in zip(times[:-1], times[1:]):
    x = net.cfg_forward(x, t, s, class_labels, cfg_scale)
  return x

"""lumalabs/tvm `training/wrapper.py`'s TVMWrapper and `generate_images.py`'s generator_fn, our
stand-in (same attributes, same maths; float32 on CPU where the authors autocast to bf16).

forward_model(x, t, s, labels, beta) = DiT(x, t, t - s, one-hot labels, beta), beta = 1/cfg.
generator_fn: x in float64 on linspace(1, 0, N + 1), x <- x + (t_next - t)·a·forward_model(x, t,
t_next, labels, 1/cfg), a = cfg with do_scale_param, else 1.
"""
import torch

from torch_utils import persistence
from training.dit import DiT, DiT_XL_2_18h  # noqa: F401  (TVMWrapper finds model_type here)


@persistence.persistent_class
class TVMWrapper(torch.nn.Module):

  def __init__(self, img_resolution, img_channels, label_dim=0, mixed_precision=None,
               model_type="DiT_XL_2_18h", data_type="bf16", detach_jvp=False,
               do_scale_param=False, **model_kwargs):
    super().__init__()
    self.img_resolution = img_resolution
    self.img_channels = img_channels
    self.label_dim = label_dim
    self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(data_type, torch.float32)
    self.model_kwargs = model_kwargs
    self.model = globals()[model_type](img_resolution=img_resolution, img_channels=img_channels,
                                       in_channels=img_channels, out_channels=img_channels,
                                       label_dim=label_dim, **model_kwargs)
    self.do_scale_param = do_scale_param
    self.detach_jvp = detach_jvp

  def forward_model(self, x, t, s, class_labels=None, beta_scale=None):
    out = self.model(x.float(), t.float().flatten(), (t - s).float().flatten(),
                     class_labels=class_labels,
                     guidance_scale=None if beta_scale is None else beta_scale.float().flatten())
    return out.to(t.dtype)


@torch.no_grad()
def generator_fn(net, latents, class_labels=None, num_steps=1, cfg_scale=None):
  times = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
  x = latents.to(torch.float64)
  beta = (1 / torch.as_tensor(cfg_scale, dtype=torch.float64).view(-1, 1, 1, 1)).repeat(
      x.shape[0], 1, 1, 1)
  out_scale = cfg_scale if net.do_scale_param else 1.0
  for t, s in zip(times[:-1], times[1:]):
    x = x + (s - t) * net.forward_model(x, t, s, class_labels, beta).double() * out_scale
  return x

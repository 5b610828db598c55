"""PyTorch pixel-MeanFlow DiT, the twin of models/pmf_dit.py (after the facts of Lyy-iiis/pMF
`models/pmfDiT.py`): torch_imf_dit's in-context DiT with JiT's bottleneck patch embedding (proj1
with a bias), a learned pos_embed over the whole sequence, 2-D RoPE on the patch tokens, and the
network's own conversion of its heads' `prediction` into velocities:

  u = (z - x̂_u)/clip(t, t_floor, 1),  v = (z - x̂_v)/clip(t, t_floor, 1),
  x̂ = torch_sampling.to_x_eps(prediction, head output, z, t, rectified flow, min_divisor=t_floor)

with k = sigmoid(w_k_scale·w_k) for prediction 'u_k' (w_k a parameter, as in the JAX network).
forward(x, t, y, s=None, guidance=None, interval=None, v_head=False) as torch_imf_dit's, except
that t (a float or an [N] tensor) is needed: it converts the output. torch_sampling.
sample_mean_flow samples it as it samples iMF's network. Names are the official ones
(x_embedder.proj1/proj2, pos_embed [L, D]), so `export/convert.imf_dit_to_torch` of a pmf_dit's
params loads with strict=True. torch and numpy only, no JAX.
"""
import torch
from torch import nn

from kdiff_jax.export.torch_imf_dit import ImfDiT
from kdiff_jax.export.torch_jit import BottleneckPatchEmbed
from kdiff_jax.export.torch_layers import VisionRotaryEmbeddingFast
from kdiff_jax.export.torch_sampling import Schedule, to_x_eps


class PmfDiT(ImfDiT):
  """pMF's DiT: ImfDiT's trunk and heads on bottleneck patches, outputs converted to u, v."""

  def __init__(self, input_size: int = 256, patch_size: int = 16, in_channels: int = 3,
               hidden_size: int = 768, depth: int = 16, num_heads: int = 12,
               head_depth: int = 8, bottleneck_dim: int = 128, mlp_ratio: float = 4.0,
               num_classes: int = 1000, prediction: str = "x", t_floor: float = 0.05,
               w_k_scale: float = 1.0):
    super().__init__(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                     hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                     head_depth=head_depth, mlp_ratio=mlp_ratio, num_classes=num_classes)
    self.x_embedder = BottleneckPatchEmbed(patch_size, in_channels, bottleneck_dim, hidden_size,
                                           proj1_bias=True)
    grid_size = input_size // patch_size
    self.pos_embed = nn.Parameter(torch.zeros(self.num_prefix_tokens + grid_size**2,
                                              hidden_size))
    rope = VisionRotaryEmbeddingFast(hidden_size // num_heads, grid_size, self.num_prefix_tokens)
    self.rope_cos, self.rope_sin = rope.freqs_cos, rope.freqs_sin
    self.prediction, self.t_floor, self.w_k_scale = prediction, t_floor, w_k_scale
    if prediction == "u_k":
      self.w_k = nn.Parameter(torch.zeros(()))

  def sequence(self, prefix, patches):
    return super().sequence(prefix, patches) + self.pos_embed

  def velocity(self, z, t, output):
    """(z - x̂)/clip(t, t_floor, 1), x̂ the `prediction` output's data estimate at (z, t)."""
    t = torch.as_tensor(t, dtype=torch.float32, device=z.device).reshape(-1, 1, 1, 1)
    k = torch.sigmoid(self.w_k_scale * self.w_k) if self.prediction == "u_k" else None
    x_hat, _ = to_x_eps(self.prediction, output, z, t, Schedule("rectified_flow"), k=k,
                        min_divisor=self.t_floor)
    return (z - x_hat) / t.clamp(self.t_floor, 1.0)

  def forward(self, x, t, y, s=None, guidance=None, interval=None, v_head: bool = False):
    if t is None:
      raise ValueError("pMF's network converts its heads' outputs with t: t is needed")
    out = super().forward(x, t, y, s, guidance=guidance, interval=interval, v_head=v_head)
    if v_head:
      return tuple(self.velocity(x, t, head) for head in out)
    return self.velocity(x, t, out)

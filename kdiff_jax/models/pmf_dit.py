"""Pixel MeanFlow's DiT (pMF, "One-step Latent-free Image Generation with Pixel Mean Flows",
arXiv 2601.22158), in Flax NNX.

Written after the facts of the official code, Lyy-iiis/pMF `models/pmfDiT.py` (pmfDiT and its
sizes), `models/embedder.py` (BottleneckPatchEmbedder) and `configs/pMF_*_config.yml`. It is
iMF's in-context DiT (models/imf_dit.py: condition tokens [class 8 | ω 4 | t_min 2 | t_max 2 |
h 4], a shared trunk of depth - head_depth blocks, u and v heads of head_depth blocks, RMSNorm,
per-head RMS qk-norm, SwiGLU, zero-initialised residual scales and final layers) on pixels, with
three changes to its input:

  x_embedder  JiT's bottleneck: conv p x p to 128 channels (256 when D > 1024), then a 1 x 1 conv
              to D, both with a zero-initialised bias, kernels xavier_uniform
  pos_embed   a learned [L, D] table, N(0, 0.02²), added to the whole sequence (L = 20 + T)
  RoPE        2-D over the patch grid (a head's first half of channel pairs rotates with the
              row, the second half with the column: layers.rope_2d), condition tokens unrotated

and heads that predict x, which the network turns into velocities itself with its own t:

  x̂_u, x̂_v = heads(tokens(z, h = t - r, 1 - 1/ω, t_min, t_max, y))
  u = (z - x̂_u)/clip(t, t_floor, 1),   v = (z - x̂_v)/clip(t, t_floor, 1),   t_floor = 0.05

so an objective and a sampler see (u, v) exactly as iMF's network gives them. t itself is never
embedded (only h = t - r is); it enters the conversion alone.

k-Diff's question (which target should the network predict?) is `prediction`: the raw head
output o is a prediction of that kind on the flow schedule alpha = 1 - t, sigma = t, turned into
x̂ by parameterization.to_x_eps with min_divisor = t_floor (a divisor that vanishes at an end is
clamped from below by t_floor), then u = (z - x̂)/clip(t, t_floor, 1) as above:

  x         x̂ = o                                   (pMF: the official network, bit for bit)
  eps       x̂ = (z - t·o)/max(1 - t, t_floor)
  velocity  x̂ = z - t·o                             (o ≈ n - x: JiT's "v"; the divisor is 1)
  u_k       x̂ = ((1 - k)·z + t·o)/max(Delta, t_floor),  Delta = (1 - t)(1 - k) + t·k

For u_k, k = sigmoid(s·w_k) (objectives/kdiff.py's k, through parameterization.k_of_logit) with
w_k a scalar parameter of this network (so it is trained, kept in the EMA, checkpointed and
exported with it, as 'w_k'), initialised at logit(k_init)/s; k_init and s are the k-Diff
objective's objective.kdiff.k_init and .w_k_scale. With prediction 'x' there is no w_k.

Sizes (model.size / model.patch_size; the official pmfDiT_{B,L,H}_{16,32}: depth counts the
shared blocks plus one head, head_depth 8), parameters with 1000 classes, the training model
(with the v head) / what one-step sampling runs (without it):

  B/16  depth 16, D 768,  12 heads, bottleneck 128, 256 px   175.5M / 118.2M
  L/16  depth 32, D 1024, 16 heads, bottleneck 128, 256 px   511.8M / 410.3M
  H/16  depth 48, D 1280, 16 heads, bottleneck 256, 256 px  1113.3M / 955.0M
  B/32, L/32, H/32 the same at 512 px                  179.3M / 120.3M, 516.8M / 413.0M,
                                                        1119.8M / 958.5M

(model.mlp_ratio = 4 gives the official SwiGLU width int(8/3·D).) T and XS are tiny CPU sizes.
Parameter names are the official module names; pos_embed is stored [L, D] (the official
[1, L, D]), as imf_dit stores its condition tokens.
"""
import jax.numpy as jnp
from flax import nnx

from kdiff_jax import parameterization, schedules
from kdiff_jax.models import imf_dit, layers

# name -> (depth = shared + one head, hidden_size, num_heads, head_depth, bottleneck_dim).
SIZES = {
    "T": (2, 64, 2, 1, 16),
    "XS": (3, 96, 4, 1, 32),
    "B": (16, 768, 12, 8, 128),
    "L": (32, 1024, 16, 8, 128),
    "H": (48, 1280, 16, 8, 256),
}
PATCH_SIZES = (1, 2, 4, 8, 16, 32)
# What the raw head output predicts (model.prediction); parameterization's names.
PREDICTIONS = ("x", "eps", "velocity", "u_k")
T_FLOOR = 0.05
SCHEDULE = schedules.get("rectified_flow")


class PmfDiT(imf_dit.ImfDiT):
  """pMF's DiT: ImfDiT's call (x = z_t, t, y, s = h, guidance, interval, v_head, u_head) ->
  u (and v) [B, H, W, C] float32, converted from the heads' `prediction` with t."""

  def __init__(self, *, input_size: int, in_channels: int, patch_size: int, hidden_size: int,
               depth: int, num_heads: int, head_depth: int, bottleneck_dim: int,
               mlp_ratio: float = 4.0, num_classes: int, prediction: str = "x",
               t_floor: float = T_FLOOR, k_init: float = 0.5, w_k_scale: float = 1.0,
               dtype=jnp.float32, remat: str = "none", scan_blocks: bool = False,
               rngs: nnx.Rngs):
    if prediction not in PREDICTIONS:
      raise ValueError(f"model.prediction={prediction!r}: allowed values are {list(PREDICTIONS)}")
    super().__init__(input_size=input_size, in_channels=in_channels, patch_size=patch_size,
                     hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                     head_depth=head_depth, mlp_ratio=mlp_ratio, num_classes=num_classes,
                     bottleneck_dim=bottleneck_dim, dtype=dtype, remat=remat,
                     scan_blocks=scan_blocks, rngs=rngs)
    self.prediction, self.t_floor, self.w_k_scale = prediction, float(t_floor), float(w_k_scale)
    sequence_length = self.num_prefix_tokens + self.grid_size**2
    self.pos_embed = nnx.Param(layers.partitioned(nnx.initializers.normal(0.02), (None, "embed"))(
        rngs.params(), (sequence_length, hidden_size), jnp.float32))
    if prediction == "u_k":
      self.w_k = nnx.Param(jnp.asarray(parameterization.logit_of_k(k_init, w_k_scale),
                                       jnp.float32))

  def rope(self):
    """(cos, sin) [num_prefix_tokens + T, head_dim]: 2-D over the patch grid, prefix unrotated."""
    return layers.rope_2d(self.hidden_size // self.num_heads, self.grid_size,
                          self.num_prefix_tokens)

  def sequence(self, prefix, patches):
    """[condition tokens | patch tokens] + pos_embed."""
    tokens = super().sequence(prefix, patches)
    return tokens + self.pos_embed[...].astype(tokens.dtype)

  def k(self):
    """k-Diff's k = sigmoid(w_k_scale·w_k) (prediction 'u_k' only)."""
    return parameterization.k_of_logit(self.w_k[...], self.w_k_scale)

  def velocity(self, z, t, output):
    """(z - x̂)/clip(t, t_floor, 1), x̂ the `prediction` output's data estimate at (z, t)."""
    t = jnp.asarray(t)
    t = t.astype(jnp.promote_types(t.dtype, output.dtype))
    z = z.astype(output.dtype)
    k = self.k() if self.prediction == "u_k" else None
    x_hat, _ = parameterization.to_x_eps(self.prediction, output, z, t, SCHEDULE, k=k,
                                         min_divisor=self.t_floor)
    return (z - x_hat) / jnp.clip(parameterization.broadcast_time(t, z), self.t_floor, 1.0)

  def __call__(self, x, t, y, s=None, guidance=None, interval=None, v_head: bool = False,
               u_head: bool = True):
    """u (or (u, v), or v: ImfDiT's heads) at z = x, converted with t (a scalar or [B])."""
    if t is None:
      raise ValueError("model.name='pmf_dit' converts its heads' outputs with t: t is needed")
    outputs = super().__call__(x, t, y, s, guidance, interval, v_head=v_head, u_head=u_head)
    if isinstance(outputs, tuple):
      return tuple(self.velocity(x, t, out) for out in outputs)
    return self.velocity(x, t, outputs)


def check(config) -> None:
  """model.name='pmf_dit': iMF's inputs (imf_dit.check), the flow schedule its conversion
  assumes, and for prediction 'u_k' one learnable k from objective.kdiff."""
  imf_dit.check(config)
  if config.objective.schedule != "rectified_flow":
    raise ValueError(f"objective.schedule={config.objective.schedule!r}: model.name='pmf_dit' "
                     "converts its output on the flow path z = (1 - t)·x + t·e: set "
                     "objective.schedule='rectified_flow'")
  kdiff = config.objective.kdiff
  if config.model.prediction == "u_k":
    if not 0.0 < kdiff.k_init < 1.0:
      raise ValueError(f"objective.kdiff.k_init={kdiff.k_init!r}: model.prediction='u_k' starts "
                       "w_k at logit(k_init), so k_init must be in (0, 1)")
    if kdiff.time_dependent or not kdiff.learnable:
      raise ValueError("model.prediction='u_k' learns one k: set objective.kdiff.learnable=True "
                       "and objective.kdiff.time_dependent=False")


def pmf_dit_from_config(config, dtype, rngs: nnx.Rngs) -> PmfDiT:
  """A PmfDiT from config.model.{size, patch_size, mlp_ratio, prediction, t_floor, remat,
  scan_blocks}, config.data.{image_size, channels, num_classes} and, for prediction 'u_k',
  config.objective.kdiff.{k_init, w_k_scale} (checked by models.check), computing in `dtype`."""
  model = config.model
  depth, hidden_size, num_heads, head_depth, bottleneck_dim = SIZES[model.size]
  kdiff = config.objective.kdiff
  return PmfDiT(input_size=config.data.image_size, in_channels=config.data.channels,
                patch_size=model.patch_size, hidden_size=hidden_size, depth=depth,
                num_heads=num_heads, head_depth=head_depth, bottleneck_dim=bottleneck_dim,
                mlp_ratio=model.mlp_ratio, num_classes=config.data.num_classes,
                prediction=model.prediction, t_floor=model.t_floor, k_init=kdiff.k_init,
                w_k_scale=kdiff.w_k_scale, dtype=dtype, remat=model.remat,
                scan_blocks=model.scan_blocks, rngs=rngs)

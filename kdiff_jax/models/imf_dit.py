"""The improved-MeanFlow DiT (iMF, Geng et al. 2025, "Improved Mean Flows"), in Flax NNX.

Written after the facts of Lyy-iiis/imeanflow `models/imfDiT.py` (the official JAX code): no
adaLN; every condition is a group of in-context tokens prepended to the patch tokens, and the
last blocks are duplicated into a u head (average velocity) and a v head (instantaneous
velocity, an auxiliary training output, skipped when sampling):

  tokens = [class (8) | guidance (4) | t_min (2) | t_max (2) | time (4) | patches (T)]
           each group = its learned tokens + the embedding of its scalar, broadcast:
           class: y_embedder(y);  guidance: omega_embedder(1 - 1/ω);
           t_min, t_max: the guidance interval's embedders;  time: h_embedder(h), h = t - r
  x = shared_blocks(tokens)                 depth - head_depth blocks
  u = u_final_layer(u_heads(x)[patches])    head_depth blocks each
  v = v_final_layer(v_heads(x)[patches])    (only with v_head=True)

The network time t is *not* an input: only h = t - r enters (as in the official code, after
"Is noise conditioning necessary", Sun et al. 2025). Blocks: RMSNorm, attention with separate
q/k/v/out projections (no bias), per-head RMS qk-norm and 1-D RoPE over the whole sequence
(condition tokens included, positions 0..L-1), a SwiGLU MLP w2(silu(w1 x)·w3 x) (no bias), and
zero-initialised per-channel residual scales: x += attn_scale·attn(norm1 x); x += mlp_scale·mlp(
norm2 x). The final layers are RMSNorm + a zero-initialised linear. No absolute position
embedding. Scalars enter the embedders raw (h, 1 - 1/ω, t_min, t_max in [0, 1]; no ×1000).

Initialisation (the official one): block linears N(0, (0.32/√fan_in)²), embedder linears
N(0, 1/fan_in), label table and condition tokens N(0, 1/hidden), patch conv xavier_uniform,
residual scales and final layers zero (the network starts at u = v = 0).

Sizes (depth counts the shared blocks plus one head, as the official `depth`): B/2 89M, M/2
174M, L/2 409M, XL/2 610M parameters without the v head (what sampling runs), 146M / 231M / 510M
/ 711M with it. model.mlp_ratio = 4 gives the official SwiGLU width int(int(4·D)·2/3) =
int(8/3·D) (2048 for D = 768, 2730 for D = 1024).

Parameter names are the official module names, so a parameter path maps onto the torch twin's
state_dict key (export/torch_imf_dit.py) by export/convert.py's `torch_name`.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from kdiff_jax import parallel
from kdiff_jax.models import dit, jit, layers

# name -> (depth = shared + one head, hidden_size, num_heads, head_depth). B, M, L, XL are the
# official imfDiT_{B,M,L,XL}_2; T and XS are tiny CPU sizes.
SIZES = {
    "T": (2, 64, 2, 1),
    "XS": (3, 96, 4, 1),
    "B": (12, 768, 12, 8),
    "M": (24, 768, 12, 8),
    "L": (32, 1024, 16, 8),
    "XL": (48, 1024, 16, 8),
}
PATCH_SIZES = (1, 2, 4, 8)
# Condition token groups in sequence order, with their official counts.
TOKEN_GROUPS = (("class_tokens", 8), ("omega_tokens", 4), ("t_min_tokens", 2),
                ("t_max_tokens", 2), ("time_tokens", 4))
# The three stacks of blocks (each an nnx.List, or one scanned module with model.scan_blocks).
STACKS = ("shared_blocks", "u_heads", "v_heads")
BLOCK_INIT_CONSTANT = 0.32


def scaled_normal(constant: float = 1.0, fan_in_axis: int = 0):
  """N(0, (constant/√fan_in)²), fan_in = shape[fan_in_axis] (the official 'scaled_variance')."""
  def init(key, shape, dtype=jnp.float32):
    return constant / math.sqrt(shape[fan_in_axis]) * jax.random.normal(key, shape, dtype)
  return init


def _linear(in_features: int, out_features: int, axes, *, rngs: nnx.Rngs, use_bias=False,
            constant=BLOCK_INIT_CONSTANT, kernel_init=None, dtype=jnp.float32) -> nnx.Linear:
  """nnx.Linear (default without bias), kernel [in, out] named `axes`, N(0, (constant/√in)²)."""
  kernel_init = kernel_init or scaled_normal(constant)
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=layers.partitioned(kernel_init, axes),
      bias_init=layers.partitioned(layers.zeros, axes[-1:]), rngs=rngs)


@functools.lru_cache(maxsize=None)
def rope_1d(head_dim: int, seq_len: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
  """1-D RoPE tables (cos, sin), each [seq_len, head_dim]: channel pair (2i, 2i+1) of a head at
  position p rotates by p·theta^(-2i/head_dim) (the official `precompute_rope_freqs` on the
  complex view of consecutive pairs). Float32 read-only constants for `layers.apply_rope`."""
  assert head_dim % 2 == 0, f"head_dim {head_dim} must be even for RoPE"
  freqs = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  angle = np.repeat(np.arange(seq_len, dtype=np.float64)[:, None] * freqs, 2, axis=1)
  cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
  cos.setflags(write=False)
  sin.setflags(write=False)
  return cos, sin


class TimestepEmbedder(layers.TimestepEmbedder):
  """DiT's sinusoidal embedder (256 frequencies, max period 10^4; mlp/0, mlp/2), initialised as the
  official one: both linears N(0, 1/fan_in), biases zero."""

  def __init__(self, hidden_size: int, *, rngs: nnx.Rngs):
    self.frequency_embedding_size = layers.FREQUENCY_EMBEDDING_SIZE
    self.mlp = nnx.List([
        _linear(self.frequency_embedding_size, hidden_size, (None, "embed"), use_bias=True,
                constant=1.0, rngs=rngs),
        jax.nn.silu,
        _linear(hidden_size, hidden_size, ("mlp", "embed"), use_bias=True, constant=1.0,
                rngs=rngs),
    ])


class LabelEmbedder(layers.LabelEmbedder):
  """A table of num_classes + 1 rows (row num_classes: the null label), N(0, 1/hidden)."""

  def __init__(self, num_classes: int, hidden_size: int, *, rngs: nnx.Rngs):
    self.num_classes = num_classes
    self.embedding_table = nnx.Embed(
        num_classes + 1, hidden_size, dtype=jnp.float32, param_dtype=jnp.float32,
        embedding_init=layers.partitioned(scaled_normal(1.0, fan_in_axis=1), ("classes", "embed")),
        rngs=rngs)


class RoPEAttention(nnx.Module):
  """softmax(q kᵀ/√d) v with q, k, v = separate projections (no bias), per-head RMS q/k norms,
  then 1-D RoPE on q and k; out_proj (no bias). XLA attention (jax.jvp goes through it)."""

  def __init__(self, hidden_size: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    assert hidden_size % num_heads == 0, (hidden_size, num_heads)
    self.num_heads = num_heads
    head_dim = hidden_size // num_heads
    proj = lambda axes: _linear(hidden_size, hidden_size, axes, dtype=dtype, rngs=rngs)
    self.q_proj, self.k_proj, self.v_proj = (proj(("embed", "heads")) for _ in range(3))
    self.out_proj = proj(("heads", "embed"))
    self.q_norm = layers.rms_norm(head_dim, axis_name=None, dtype=dtype, rngs=rngs)
    self.k_norm = layers.rms_norm(head_dim, axis_name=None, dtype=dtype, rngs=rngs)

  def __call__(self, x, rope):
    heads = lambda y: rearrange(y, "b t (h d) -> b t h d", h=self.num_heads)
    q = layers.apply_rope(self.q_norm(heads(self.q_proj(x))), rope)
    k = layers.apply_rope(self.k_norm(heads(self.k_proj(x))), rope)
    out = jax.nn.dot_product_attention(q, k, heads(self.v_proj(x)))
    return self.out_proj(rearrange(out, "b t h d -> b t (h d)"))


class SwiGLUMlp(nnx.Module):
  """w2(silu(w1 x) · w3 x), hidden `mlp_hidden`, no biases."""

  def __init__(self, hidden_size: int, mlp_hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.w1 = _linear(hidden_size, mlp_hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.w3 = _linear(hidden_size, mlp_hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.w2 = _linear(mlp_hidden, hidden_size, ("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class ImfBlock(nnx.Module):
  """x += attn_scale·attn(norm1(x)); x += mlp_scale·mlp(norm2(x)); the scales start at zero."""

  def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.norm1 = layers.rms_norm(hidden_size, dtype=dtype, rngs=rngs)
    self.attn = RoPEAttention(hidden_size, num_heads, dtype=dtype, rngs=rngs)
    self.norm2 = layers.rms_norm(hidden_size, dtype=dtype, rngs=rngs)
    self.mlp = SwiGLUMlp(hidden_size, mlp_hidden, dtype=dtype, rngs=rngs)
    scale = layers.partitioned(layers.zeros, ("embed",))
    self.attn_scale = nnx.Param(scale(rngs.params(), (hidden_size,), jnp.float32))
    self.mlp_scale = nnx.Param(scale(rngs.params(), (hidden_size,), jnp.float32))

  def __call__(self, x, rope):
    x = x + self.attn(self.norm1(x), rope) * self.attn_scale[...].astype(x.dtype)
    return x + self.mlp(self.norm2(x)) * self.mlp_scale[...].astype(x.dtype)


class FinalLayer(nnx.Module):
  """linear(norm(x)) -> p·p·C per token; RMSNorm, the linear zero-initialised (with a bias)."""

  def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.norm = layers.rms_norm(hidden_size, dtype=dtype, rngs=rngs)
    self.linear = layers.linear(hidden_size, patch_size * patch_size * out_channels,
                                ("embed", None), kernel_init=layers.zeros, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.linear(self.norm(x))


def _per_row(value, batch: int, default: float):
  """A scalar or [B] condition as a float32 [B] vector (`default` when None)."""
  value = default if value is None else value
  return jnp.broadcast_to(jnp.asarray(value, jnp.float32).reshape(-1), (batch,))


class ImfDiT(nnx.Module):
  """iMF's DiT: [B, H, W, C] x, [B] labels (num_classes = null), h = t - r, guidance ω and its
  interval as inputs -> u [B, H, W, C] float32 (and v with v_head=True).

  bottleneck_dim > 0 embeds the patches with JiT's bottleneck (conv p x p to bottleneck_dim, then
  1 x 1 to the width, both with biases: pixel MeanFlow's, models/pmf_dit.py); 0, a linear patch
  embedding (iMF's). Subclasses change the sequence (`sequence`) and positions (`rope`).
  """

  def __init__(self, *, input_size: int, in_channels: int, patch_size: int, hidden_size: int,
               depth: int, num_heads: int, head_depth: int, mlp_ratio: float = 4.0,
               num_classes: int, token_groups=TOKEN_GROUPS, bottleneck_dim: int = 0,
               dtype=jnp.float32, remat: str = "none", scan_blocks: bool = False,
               rngs: nnx.Rngs):
    if not 0 < head_depth < depth:
      raise ValueError(f"head_depth={head_depth} must be in [1, depth - 1] (depth={depth})")
    dit.set_backbone_attributes(self, input_size=input_size, in_channels=in_channels,
                                patch_size=patch_size, hidden_size=hidden_size,
                                num_heads=num_heads, num_classes=num_classes, time_scale=1.0,
                                dtype=dtype, remat=remat, scan_blocks=scan_blocks)
    self.depth, self.head_depth = depth, head_depth
    self.token_groups = tuple((name, int(count)) for name, count in token_groups)
    self.num_prefix_tokens = sum(count for _, count in self.token_groups)

    if bottleneck_dim:
      self.x_embedder = jit.BottleneckPatchEmbed(patch_size, in_channels, bottleneck_dim,
                                                 hidden_size, proj1_bias=True, dtype=dtype,
                                                 rngs=rngs)
    else:
      self.x_embedder = layers.PatchEmbed(patch_size, in_channels, hidden_size, dtype=dtype,
                                          rngs=rngs)
    self.h_embedder = TimestepEmbedder(hidden_size, rngs=rngs)
    self.omega_embedder = TimestepEmbedder(hidden_size, rngs=rngs)
    self.cfg_t_start_embedder = TimestepEmbedder(hidden_size, rngs=rngs)
    self.cfg_t_end_embedder = TimestepEmbedder(hidden_size, rngs=rngs)
    self.y_embedder = LabelEmbedder(num_classes, hidden_size, rngs=rngs)
    token_init = layers.partitioned(scaled_normal(1.0, fan_in_axis=1), (None, "embed"))
    for name, count in self.token_groups:
      setattr(self, name, nnx.Param(token_init(rngs.params(), (count, hidden_size), jnp.float32)))

    mlp_hidden = int(int(hidden_size * mlp_ratio) * 2 / 3)
    make_block = lambda rngs: ImfBlock(hidden_size, num_heads, mlp_hidden, dtype=dtype, rngs=rngs)
    self.shared_blocks = layers.blocks(make_block, depth - head_depth, rngs, scan=scan_blocks)
    self.u_heads = layers.blocks(make_block, head_depth, rngs, scan=scan_blocks)
    self.v_heads = layers.blocks(make_block, head_depth, rngs, scan=scan_blocks)
    final = lambda: FinalLayer(hidden_size, patch_size, self.out_channels, dtype=dtype, rngs=rngs)
    self.u_final_layer = final()
    self.v_final_layer = final()

  def rope(self):
    """(cos, sin) [num_prefix_tokens + T, head_dim]: 1-D positions over the whole sequence."""
    return rope_1d(self.hidden_size // self.num_heads, self.num_prefix_tokens + self.grid_size**2)

  def condition_tokens(self, y, h, omega, t_min, t_max):
    """[B, num_prefix_tokens, D] float32: each group's tokens + its embedding (sequence order)."""
    embeddings = {
        "class_tokens": self.y_embedder(y),
        "omega_tokens": self.omega_embedder(1.0 - 1.0 / omega),
        "t_min_tokens": self.cfg_t_start_embedder(t_min),
        "t_max_tokens": self.cfg_t_end_embedder(t_max),
        "time_tokens": self.h_embedder(h),
    }
    return jnp.concatenate([getattr(self, name)[...][None] + embeddings[name][:, None]
                            for name, _ in self.token_groups], axis=1)

  def sequence(self, prefix, patches):
    """The blocks' input [B, num_prefix_tokens + T, D]: condition tokens, then patch tokens."""
    return jnp.concatenate([prefix, patches], axis=1)

  def __call__(self, x, t, y, s=None, guidance=None, interval=None, v_head: bool = False,
               u_head: bool = True):
    """u(x, h = s, ω = guidance, [t_min, t_max] = interval, y); t is accepted and not used.

    s (h = t - r), guidance (ω ≥ 1) and interval ((t_min, t_max), each a scalar or [B]) default
    to h = 0, ω = 1 and (0, 1): the instantaneous velocity without guidance. Returns u, or (u, v)
    with v_head=True (v: the auxiliary instantaneous-velocity head), or v alone with
    v_head=True, u_head=False (the u head's blocks are then not run).
    """
    del t  # only h = t - r conditions the network (official imfDiT)
    if not (u_head or v_head):
      raise ValueError("at least one of u_head, v_head must be True")
    batch = x.shape[0]
    t_min, t_max = (None, None) if interval is None else interval
    prefix = self.condition_tokens(
        y, _per_row(s, batch, 0.0), _per_row(guidance, batch, 1.0),
        _per_row(t_min, batch, 0.0), _per_row(t_max, batch, 1.0))
    tokens = self.sequence(prefix.astype(self.dtype), self.x_embedder(x.astype(self.dtype)))
    tokens = parallel.constrain_batch(tokens)
    rope = self.rope()
    remat = dict(policy=self._remat_policy, use_remat=self._use_remat)
    tokens = layers.run_blocks(self.shared_blocks, tokens, rope, **remat)

    def head(blocks, final_layer):
      out = layers.run_blocks(blocks, tokens, rope, **remat)
      out = final_layer(out[:, self.num_prefix_tokens:])
      out = layers.unpatchify(out, self.patch_size, self.out_channels)
      return out.astype(jnp.promote_types(out.dtype, jnp.float32))  # bf16 -> f32; f64 stays

    outputs = ((head(self.u_heads, self.u_final_layer),) if u_head else ()) + (
        (head(self.v_heads, self.v_final_layer),) if v_head else ())
    return outputs[0] if len(outputs) == 1 else outputs


def check(config) -> None:
  """model.name='imf_dit' (iMF's network: objectives/imf.py asks for it) and 'pmf_dit' (its pixel
  sibling) read h = t - r as their second time input, and embed the raw scalars
  (model.time_scale = 1, as the official code)."""
  model = config.model
  if not model.second_time_embedder:
    raise ValueError(f"model.name={model.name!r} reads h = t - r as its second time input: set "
                     "model.second_time_embedder=True")
  if model.time_scale != 1.0:
    raise ValueError(f"model.time_scale={model.time_scale}: model.name={model.name!r} embeds the "
                     "raw h, 1 - 1/omega and interval in [0, 1]: set model.time_scale=1.0")


def imf_dit_from_config(config, dtype, rngs: nnx.Rngs) -> ImfDiT:
  """An ImfDiT from config.model.{size, patch_size, mlp_ratio, remat, scan_blocks} and
  config.data.{image_size, channels, num_classes} (checked by models.check), computing in
  `dtype`."""
  model = config.model
  depth, hidden_size, num_heads, head_depth = SIZES[model.size]
  return ImfDiT(input_size=config.data.image_size, in_channels=config.data.channels,
                patch_size=model.patch_size, hidden_size=hidden_size, depth=depth,
                num_heads=num_heads, head_depth=head_depth, mlp_ratio=model.mlp_ratio,
                num_classes=config.data.num_classes, dtype=dtype, remat=model.remat,
                scan_blocks=model.scan_blocks, rngs=rngs)


def forward_macs(*, input_size: int, in_channels: int, patch_size: int, hidden_size: int,
                 depth: int, head_depth: int, mlp_ratio: float = 4.0, v_head: bool = True,
                 num_prefix_tokens: int = sum(count for _, count in TOKEN_GROUPS)) -> int:
  """Multiply-accumulates of one image's forward pass (matmuls; attention included), as
  dit.forward_macs counts DiT's: per block with L = prefix + patch tokens, D, SwiGLU hidden m:
  L·4D² (q, k, v, out) + 2·L²·D (QKᵀ, attention·V) + L·3·D·m; the patch embedding, the final
  layer on the patch tokens, and 4 scalar embedders (256·D + D²). v_head adds its blocks and
  final layer (the training pass)."""
  tokens = (input_size // patch_size) ** 2
  seq, d = num_prefix_tokens + tokens, hidden_size
  m = int(int(d * mlp_ratio) * 2 / 3)
  patch = patch_size * patch_size * in_channels
  block = seq * 4 * d * d + 2 * seq * seq * d + seq * 3 * d * m
  blocks = depth + (head_depth if v_head else 0)
  finals = (2 if v_head else 1) * tokens * d * patch
  embedders = 4 * (layers.FREQUENCY_EMBEDDING_SIZE * d + d * d)
  return int(blocks * block + tokens * patch * d + finals + embedders)

"""Layers shared by the DiT (models/dit.py) and the pixel JiT (models/jit.py): embeddings,
attention (optionally with JiT's qk-norm and 2-D RoPE), MLP, norms, patches.

Written after facebookresearch/DiT `models.py` (Peebles & Xie 2023), timm's `Attention` /
`Mlp` and LTH14/JiT `model_jit.py` / `util/model_util.py` (Li & He 2025), with the same
attribute names so a parameter path maps onto the PyTorch state_dict key by a rename (see
export/convert.py's `torch_name`) and a transpose.

Conventions:
* Images are NHWC; tokens are [B, T, D] in row-major patch order (as torch's
  `proj(x).flatten(2).transpose(1, 2)`).
* Parameters are float32; `dtype` is the compute dtype of a Linear / Conv.
* Every parameter carries logical axis names (`nnx.with_partitioning`, stored by flax 0.12 in the
  variable metadata `out_sharding`; `nnx.get_partition_spec(state)` reads them). The names are
  'embed' (hidden size), 'mlp' (MLP hidden, adaLN outputs), 'heads' (fused qkv output, attention
  projection input), 'classes' (label table rows) and None (patch / spatial / small dims).
  Variables are created with `eager_sharding=False`: the model builds anywhere (no mesh needed),
  and the trainer places parameters with `jit(init, out_shardings=...)` from these names.
"""
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from kdiff_jax import parallel

FREQUENCY_EMBEDDING_SIZE = 256

xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
# xavier_uniform on torch's flattened [out, C·kh·kw] view of a conv kernel [kh, kw, C, out]
# (DiT and JiT initialise their patch convs "like nn.Linear").
conv_xavier_uniform = nnx.initializers.variance_scaling(
    1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)


def partitioned(init, axes: Sequence[str | None]):
  """`init` annotated with logical axis names (one per dim), without eager sharding."""
  return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


def linear(in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
           rngs: nnx.Rngs, kernel_init=xavier_uniform, bias_init=zeros,
           dtype=jnp.float32) -> nnx.Linear:
  """nnx.Linear with a bias; kernel [in, out] named `axes`, bias named after the output dim.

  Defaults follow DiT's `_basic_init`: xavier_uniform weight, zero bias.
  """
  return nnx.Linear(
      in_features, out_features, use_bias=True, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=partitioned(kernel_init, axes),
      bias_init=partitioned(bias_init, axes[-1:]), rngs=rngs)


def layer_norm(features: int, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.LayerNorm:
  """torch nn.LayerNorm(features, elementwise_affine=False, eps=1e-6): no params, stats in fp32."""
  return nnx.LayerNorm(features, epsilon=1e-6, use_bias=False, use_scale=False,
                       use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32,
                       rngs=rngs)


def rms_norm(features: int, *, rngs: nnx.Rngs, dtype=jnp.float32, axis_name: str | None = "embed"
             ) -> nnx.RMSNorm:
  """JiT's RMSNorm: x / sqrt(mean(x^2) + 1e-6) · weight (weight init 1, stats in float32).

  The learned weight is named `scale` (torch: `weight`) with logical axis `axis_name`.
  """
  return nnx.RMSNorm(features, epsilon=1e-6, use_fast_variance=False, dtype=dtype,
                     param_dtype=jnp.float32,
                     scale_init=partitioned(nnx.initializers.ones_init(), (axis_name,)), rngs=rngs)


def rms_norm_without_affine(features: int, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.RMSNorm:
  """torch nn.RMSNorm(features, elementwise_affine=False, eps=1e-6): x / sqrt(mean(x^2) + 1e-6),
  no parameters, stats in float32 (TVM's DiT norms)."""
  return nnx.RMSNorm(features, epsilon=1e-6, use_scale=False, use_fast_variance=False,
                     dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


NORMS = {"layer_norm": layer_norm, "rms_norm": rms_norm_without_affine}


def modulation_norm(modulation, chunks: int):
  """TVM's do_mod_norm: each of the `chunks` equal parts of the adaLN output [B, chunks·D]
  divided by its root mean square (eps 1e-6, no weight), in float32."""
  parts = modulation.astype(jnp.float32).reshape(modulation.shape[:-1] + (chunks, -1))
  parts = parts * jax.lax.rsqrt(jnp.mean(jnp.square(parts), axis=-1, keepdims=True) + 1e-6)
  return parts.reshape(modulation.shape).astype(modulation.dtype)


def modulate(x, shift, scale):
  """DiT `modulate`: x·(1 + scale) + shift; x [B, T, D], shift and scale [B, D]."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


# --- time and position embeddings ------------------------------------------------------------

def timestep_embedding(t, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: float = 10000.0):
  """Sinusoidal embedding [cos(t·f), sin(t·f)], f_i = max_period^(-i/half), i < half = dim // 2.

  DiT's `TimestepEmbedder.timestep_embedding` (a zero column is appended for odd dim). Float32.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    embedding = jnp.concatenate([embedding, jnp.zeros_like(embedding[:, :1])], axis=-1)
  return embedding


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos) -> np.ndarray:
  """[sin(pos·omega), cos(pos·omega)], omega_d = 10000^(-d/(embed_dim/2)); (M, embed_dim) f64."""
  assert embed_dim % 2 == 0, embed_dim
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.einsum("m,d->md", np.reshape(pos, -1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@functools.lru_cache(maxsize=None)
def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
  """DiT's fixed 2-D sin-cos position embedding, (grid_size², embed_dim) float32, a constant.

  As in DiT (from MAE): the first embed_dim/2 channels encode the column (w) index, the last
  embed_dim/2 the row (h) index, each as [sin, cos] of the 1-D embedding. Read-only array.
  """
  assert embed_dim % 4 == 0, f"hidden size {embed_dim} must be divisible by 4"
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # here w goes first (as DiT)
  emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
  emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
  emb = np.concatenate([emb_h, emb_w], axis=1).astype(np.float32)
  emb.setflags(write=False)
  return emb


class TimestepEmbedder(nnx.Module):
  """time -> hidden: Linear(256, hidden) -> SiLU -> Linear(hidden, hidden), all in float32.

  `mlp` is a list so parameter paths read mlp/0 and mlp/2 like torch's nn.Sequential.
  Init (DiT `initialize_weights`): weights normal(0.02), biases zero.
  """

  def __init__(self, hidden_size: int, *, rngs: nnx.Rngs,
               frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE):
    self.frequency_embedding_size = frequency_embedding_size
    normal = nnx.initializers.normal(0.02)
    self.mlp = nnx.List([
        linear(frequency_embedding_size, hidden_size, (None, "embed"), kernel_init=normal,
               rngs=rngs),
        jax.nn.silu,
        linear(hidden_size, hidden_size, ("mlp", "embed"), kernel_init=normal, rngs=rngs),
    ])

  def __call__(self, t):
    h = timestep_embedding(t, self.frequency_embedding_size)
    for layer in self.mlp:
      h = layer(h)
    return h


def label_embedder(num_classes: int, hidden_size: int, *, rngs: nnx.Rngs):
  """The label table of a class-conditional network, or None for an unconditional one
  (data.num_classes = 0: no label table; the labels it is given are ignored)."""
  return LabelEmbedder(num_classes, hidden_size, rngs=rngs) if num_classes else None


class LabelEmbedder(nnx.Module):
  """label -> hidden: a table with num_classes + 1 rows; row num_classes is the null (CFG) label.

  No label dropout here: the objective replaces dropped labels by num_classes. Init normal(0.02).
  """

  def __init__(self, num_classes: int, hidden_size: int, *, rngs: nnx.Rngs):
    self.num_classes = num_classes
    self.embedding_table = nnx.Embed(
        num_classes + 1, hidden_size, dtype=jnp.float32, param_dtype=jnp.float32,
        embedding_init=partitioned(nnx.initializers.normal(0.02), ("classes", "embed")),
        rngs=rngs)

  def __call__(self, labels):
    return self.embedding_table(labels)


@functools.lru_cache(maxsize=None)
def rope_2d(head_dim: int, grid_size: int, num_prefix_tokens: int = 0,
            theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
  """2-D rotary position embedding (cos, sin), each [num_prefix_tokens + grid_size², head_dim].

  JiT's VisionRotaryEmbeddingFast(dim=head_dim/2, pt_seq_len=grid_size) (EVA-02, Fang et al.
  2023): with f_i = theta^(-2i/(head_dim/2)), i < head_dim/4, channel pair (2i, 2i+1) of the
  first half of each head is rotated by row·f_i, pair (2i, 2i+1) of the second half by col·f_i
  (token = row·grid_size + col, row-major). Prefix tokens (JiT's in-context class tokens) get
  cos = 1, sin = 0: no rotation. Float32 read-only constants.
  """
  assert head_dim % 4 == 0, f"head_dim {head_dim} must be divisible by 4 for 2-D RoPE"
  quarter = head_dim // 4
  freqs = theta ** (-np.arange(quarter, dtype=np.float64) / quarter)
  angles = np.repeat(np.arange(grid_size, dtype=np.float64)[:, None] * freqs, 2, axis=1)
  rows = np.broadcast_to(angles[:, None, :], (grid_size, grid_size, 2 * quarter))
  cols = np.broadcast_to(angles[None, :, :], (grid_size, grid_size, 2 * quarter))
  angle = np.concatenate([rows, cols], axis=-1).reshape(grid_size * grid_size, head_dim)
  cos = np.concatenate([np.ones((num_prefix_tokens, head_dim)), np.cos(angle)]).astype(np.float32)
  sin = np.concatenate([np.zeros((num_prefix_tokens, head_dim)), np.sin(angle)]).astype(np.float32)
  cos.setflags(write=False)
  sin.setflags(write=False)
  return cos, sin


def apply_rope(x, rope):
  """x·cos + rotate_half(x)·sin with rotate_half(x)_(2i, 2i+1) = (-x_(2i+1), x_(2i)).

  x [B, T, heads, head_dim]; rope = rope_2d(...) = (cos, sin), each [T, head_dim].
  """
  cos, sin = (jnp.asarray(r, x.dtype)[:, None, :] for r in rope)
  pairs = x.reshape(x.shape[:-1] + (-1, 2))
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return x * cos + rotated * sin


# --- transformer pieces ----------------------------------------------------------------------

# jax.nn.dot_product_attention's implementations a model may name (model.attention).
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


class Attention(nnx.Module):
  """timm Attention (qkv_bias=True): fused qkv [D, 3D] in (3, heads, head_dim) order.

  qk_norm (JiT): per-head RMSNorm of q and k (`q_norm`, `k_norm`); `rope` = rope_2d(...)
  rotates q and k after the norm.

  `implementation` (config: model.attention; `set_attention` sets it on a built network) is
  jax.nn.dot_product_attention's: 'xla' (plain softmax attention, logits and softmax in float32,
  probabilities cast back to the compute dtype; differentiable both ways, so the only one a
  jax.jvp can go through) or 'cudnn' (cuDNN's fused flash attention, NVIDIA GPUs only, half
  precision only, a custom VJP and no JVP rule). With 'cudnn' a float32 pass (IMM's
  full-precision target pass) still runs the XLA path, since cuDNN has no float32 kernel; on a
  CPU or TPU 'cudnn' fails when the step is compiled.
  """

  def __init__(self, hidden_size: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               qk_norm: bool = False, implementation: str = "xla"):
    assert hidden_size % num_heads == 0, (hidden_size, num_heads)
    if implementation not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention implementation {implementation!r}: allowed values are "
                       f"{list(ATTENTION_IMPLEMENTATIONS)}")
    self.num_heads = num_heads
    self.implementation = implementation
    head_dim = hidden_size // num_heads
    self.q_norm = rms_norm(head_dim, axis_name=None, dtype=dtype, rngs=rngs) if qk_norm else None
    self.k_norm = rms_norm(head_dim, axis_name=None, dtype=dtype, rngs=rngs) if qk_norm else None
    self.qkv = linear(hidden_size, 3 * hidden_size, ("embed", "heads"), dtype=dtype, rngs=rngs)
    self.proj = linear(hidden_size, hidden_size, ("heads", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x, rope=None):
    q, k, v = rearrange(self.qkv(x), "b t (qkv h d) -> qkv b t h d", qkv=3, h=self.num_heads)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
      q, k = apply_rope(q, rope), apply_rope(k, rope)
    half = q.dtype in (jnp.bfloat16, jnp.float16)
    implementation = self.implementation if half else "xla"
    out = jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    return self.proj(rearrange(out, "b t h d -> b t (h d)"))


def set_attention(network: nnx.Module, implementation: str) -> nnx.Module:
  """Every `Attention` of `network` (stacked blocks included) set to `implementation`."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"model.attention={implementation!r}: allowed values are "
                     f"{list(ATTENTION_IMPLEMENTATIONS)}")
  for _, module in nnx.iter_graph(network):
    if isinstance(module, Attention):
      module.implementation = implementation
  return network


class Mlp(nnx.Module):
  """timm Mlp: fc1 -> GELU(tanh) -> fc2."""

  def __init__(self, hidden_size: int, mlp_hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.fc1 = linear(hidden_size, mlp_hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.fc2 = linear(mlp_hidden, hidden_size, ("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class SwiGLU(nnx.Module):
  """JiT's SwiGLUFFN: w3(silu(x1) · x2), (x1, x2) = split(w12(x)), hidden int(mlp_hidden·2/3).

  The 2/3 keeps the parameter count of a GELU MLP of hidden mlp_hidden (Shazeer 2020).
  """

  def __init__(self, hidden_size: int, mlp_hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    swiglu_hidden = int(mlp_hidden * 2 / 3)
    self.w12 = linear(hidden_size, 2 * swiglu_hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.w3 = linear(swiglu_hidden, hidden_size, ("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x1, x2 = jnp.split(self.w12(x), 2, axis=-1)
    return self.w3(jax.nn.silu(x1) * x2)


class PatchEmbed(nnx.Module):
  """timm PatchEmbed: Conv(kernel = stride = patch) on NHWC, then [B, h·w, D] row-major tokens.

  DiT init: xavier_uniform on the flattened [D, C·p·p] view (fan_in C·p·p, fan_out D), bias 0.
  """

  def __init__(self, patch_size: int, in_channels: int, hidden_size: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.patch_size = patch_size
    self.proj = nnx.Conv(
        in_channels, hidden_size, kernel_size=(patch_size, patch_size),
        strides=(patch_size, patch_size), padding="VALID", use_bias=True,
        dtype=dtype, param_dtype=jnp.float32,
        kernel_init=partitioned(conv_xavier_uniform, (None, None, None, "embed")),
        bias_init=partitioned(zeros, ("embed",)), rngs=rngs)

  def __call__(self, x):
    return rearrange(self.proj(x), "b h w d -> b (h w) d")


def unpatchify(x, patch_size: int, channels: int, height: int | None = None):
  """[B, h·w, p·p·C] tokens -> [B, h·p, w·p, C] image (NHWC): "b (h w) (p q c) -> b (h p) (w q) c".

  Each token's p·p·C outputs are read in (p, q, c) order, as torch DiT's `unpatchify`
  (reshape (h, w, p, q, c), einsum 'nhwpqc->nchpwq'). `height` is h (tokens per column);
  default square.
  """
  h = height if height is not None else math.isqrt(x.shape[1])
  return rearrange(x, "b (h w) (p q c) -> b (h p) (w q) c", h=h, p=patch_size, q=patch_size,
                   c=channels)


# --- rematerialisation -----------------------------------------------------------------------

REMAT_POLICIES = ("none", "full", "dots")


def remat_policy(name: str, field: str = "model.remat"):
  """Config string -> (remat?, jax.checkpoint policy).

  'none': no remat; 'full': save nothing (recompute the block); 'dots': save matmul outputs
  without batch dims (jax.checkpoint_policies.dots_with_no_batch_dims_saveable).
  """
  if name == "none":
    return False, None
  if name == "full":
    return True, jax.checkpoint_policies.nothing_saveable
  if name == "dots":
    return True, jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  raise ValueError(f"{field}={name!r}: allowed values are {list(REMAT_POLICIES)}")


def blocks(make_block, depth: int, rngs: nnx.Rngs, *, scan: bool):
  """`depth` blocks make_block(rngs): an nnx.List (paths blocks/0/..., blocks/1/...), or with
  scan=True one module whose parameters carry a leading axis of size depth named 'layers'
  (nnx.vmap), which `run_blocks` runs with one jax.lax.scan, so compile time does not grow
  with depth."""
  if not scan:
    return nnx.List([make_block(rngs) for _ in range(depth)])

  @nnx.split_rngs(splits=depth)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def stacked(rngs):
    return make_block(rngs)

  return stacked(rngs)


def run_blocks(stack, x, *args, policy=None, use_remat=False, start=0, stop=None):
  """x through blocks start..stop-1 of `blocks(...)`: block(x, *args) in order, each under
  jax.checkpoint(policy) when use_remat. A stacked module runs as one jax.lax.scan over its
  leading axis (the blocks' parameters split once, merged per step: no graph mutation inside
  the scan). Between blocks the activations stay batch-sharded (`parallel.constrain_batch`)."""
  if isinstance(stack, nnx.List):
    for block in list(stack)[start:stop]:
      x = checkpointed_call(block, policy, x, *args) if use_remat else block(x, *args)
      x = parallel.constrain_batch(x)
    return x
  graphdef, params = nnx.split(stack)
  params = jax.tree.map(lambda p: p[start:stop], params)

  def step(x, block_params):
    return parallel.constrain_batch(nnx.merge(graphdef, block_params)(x, *args)), None

  if use_remat:
    step = jax.checkpoint(step, policy=policy)
  return jax.lax.scan(step, x, params)[0]


def checkpointed_call(module: nnx.Module, policy, *args):
  """module(*args) under jax.checkpoint(policy): split -> pure function of (state, args) -> merge.

  Plain JAX (no graph mutation inside the transform); gradients flow through the state.
  """
  graphdef, state = nnx.split(module)

  def apply(state, *args):
    return nnx.merge(graphdef, state)(*args)

  return jax.checkpoint(apply, policy=policy)(state, *args)

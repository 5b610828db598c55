"""DiT: the class-conditional diffusion transformer of Peebles & Xie (2023), in Flax NNX.

A port of facebookresearch/DiT `models.py` with learn_sigma=False (output channels = input
channels), NHWC images, time t in [0, 1] (the embedder sees time_scale·t) and an optional second
time embedder `s_embedder` (IMM's s or t - s) whose output is added to the conditioning:

  c = t_embedder(time_scale·t) + y_embedder(y) [+ s_embedder(time_scale·s)]
      [+ guidance_embedder(time_scale·beta)]
  x = x_embedder(x) + pos_embed;  x = block(x, c) for each block
  out = unpatchify(final_layer(x, c))

TVM's options (lumalabs/tvm `training/dit.py`), all off by default: norm='rms_norm' (RMSNorm
without affine in place of DiT's LayerNorm), qk_norm (per-head RMSNorm of q and k, with a
weight), modulation_norm (do_mod_norm: each adaLN chunk divided by its RMS), a guidance embedder
(a TimestepEmbedder of the guidance input beta = 1/cfg, added to c), init='spectral' (every
Linear and the patch conv xavier-normal divided by its largest singular value; the zero-initialised
adaLN and output layers and the label table as DiT; 'spectral_except_embedders' leaves the time,
stride and guidance embedders at DiT's normal(0.02), TVM's time_specinit=False), and num_heads
(TVM's XL/2 has 18 heads).

Attribute names are DiT's, so a flattened parameter path maps onto the torch state_dict key with
export/convert.py's `torch_name` (a rename), and the value by a transpose: Linear kernel
[in, out] -> weight.T; Conv kernel [p, p, C, D] -> weight.transpose(3, 2, 0, 1); embedding as is. torch DiT also holds
the fixed `pos_embed` buffer [1, T, D] (here a numpy constant, recomputed from the shapes).
"""
import jax
import jax.numpy as jnp
from flax import nnx

from kdiff_jax import parallel
from kdiff_jax.models import layers

# name -> (depth, hidden_size, num_heads). T and XS are tiny sizes for CPU tests and demos.
SIZES = {
    "T": (2, 64, 2),
    "XS": (4, 128, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (1, 2, 4, 8)
INITS = ("xavier_uniform", "spectral", "spectral_except_embedders")
EMBEDDERS = ("t_embedder", "s_embedder", "guidance_embedder")


class DiTBlock(nnx.Module):
  """adaLN-Zero block: x += gate·attn(modulate(norm1(x))); x += gate·mlp(modulate(norm2(x))).

  DiT: norm = LayerNorm without affine, mlp = GELU Mlp. JiT (models/jit.py) builds the same
  block with norm = layers.rms_norm, mlp = layers.SwiGLU, qk_norm = True and passes `rope`.
  """

  def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs,
               dtype=jnp.float32, norm=layers.layer_norm, mlp=layers.Mlp, qk_norm: bool = False,
               modulation_norm: bool = False):
    self.modulation_norm = modulation_norm
    self.norm1 = norm(hidden_size, dtype=dtype, rngs=rngs)
    self.attn = layers.Attention(hidden_size, num_heads, qk_norm=qk_norm, dtype=dtype, rngs=rngs)
    self.norm2 = norm(hidden_size, dtype=dtype, rngs=rngs)
    self.mlp = mlp(hidden_size, int(hidden_size * mlp_ratio), dtype=dtype, rngs=rngs)
    # adaLN-Zero: the modulation starts at zero, so the block starts as the identity.
    self.adaLN_modulation = nnx.List([
        jax.nn.silu,
        layers.linear(hidden_size, 6 * hidden_size, ("embed", "mlp"), kernel_init=layers.zeros,
                      dtype=dtype, rngs=rngs),
    ])

  def __call__(self, x, c, rope=None):
    modulation = c
    for layer in self.adaLN_modulation:
      modulation = layer(modulation)
    if self.modulation_norm:
      modulation = layers.modulation_norm(modulation, 6)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, -1)
    x = x + gate_msa[:, None] * self.attn(layers.modulate(self.norm1(x), shift_msa, scale_msa),
                                          rope)
    x = x + gate_mlp[:, None] * self.mlp(layers.modulate(self.norm2(x), shift_mlp, scale_mlp))
    return x


class FinalLayer(nnx.Module):
  """linear(modulate(norm_final(x), shift, scale)) -> p·p·C per token; zero-initialised."""

  def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, norm=layers.layer_norm, modulation_norm: bool = False):
    self.modulation_norm = modulation_norm
    self.norm_final = norm(hidden_size, dtype=dtype, rngs=rngs)
    self.linear = layers.linear(hidden_size, patch_size * patch_size * out_channels,
                                ("embed", None), kernel_init=layers.zeros, dtype=dtype, rngs=rngs)
    self.adaLN_modulation = nnx.List([
        jax.nn.silu,
        layers.linear(hidden_size, 2 * hidden_size, ("embed", "mlp"), kernel_init=layers.zeros,
                      dtype=dtype, rngs=rngs),
    ])

  def __call__(self, x, c):
    modulation = c
    for layer in self.adaLN_modulation:
      modulation = layer(modulation)
    if self.modulation_norm:
      modulation = layers.modulation_norm(modulation, 2)
    shift, scale = jnp.split(modulation, 2, -1)
    return self.linear(layers.modulate(self.norm_final(x), shift, scale))


def set_backbone_attributes(module, *, input_size, in_channels, patch_size, hidden_size,
                            num_heads, num_classes, time_scale, dtype, remat, scan_blocks):
  """The geometry, dtype, remat and scan attributes that DiT and JiT share, checked."""
  if input_size % patch_size:
    raise ValueError(f"input_size={input_size} is not a multiple of patch_size={patch_size}")
  module.input_size = input_size
  module.in_channels = in_channels
  module.out_channels = in_channels
  module.patch_size = patch_size
  module.hidden_size = hidden_size
  module.num_heads = num_heads
  module.num_classes = num_classes
  module.time_scale = float(time_scale)
  module.dtype = jnp.dtype(dtype)
  module.remat = remat
  module._use_remat, module._remat_policy = layers.remat_policy(remat, "remat")
  module.scan_blocks = scan_blocks
  module.grid_size = input_size // patch_size


class DiT(nnx.Module):
  """DiT (learn_sigma=False): [B, H, W, C] x, [B] t in [0, 1], [B] labels (num_classes = null)."""

  def __init__(self, *, input_size: int, in_channels: int, patch_size: int, hidden_size: int,
               depth: int, num_heads: int, mlp_ratio: float, num_classes: int,
               second_time_embedder: bool, time_scale: float = 1000.0, dtype=jnp.float32,
               remat: str = "none", scan_blocks: bool = False, norm: str = "layer_norm",
               qk_norm: bool = False, modulation_norm: bool = False,
               guidance_embedder: bool = False, init: str = "xavier_uniform", rngs: nnx.Rngs):
    if norm not in layers.NORMS:
      raise ValueError(f"model.norm={norm!r}: allowed values are {list(layers.NORMS)}")
    if init not in INITS:
      raise ValueError(f"model.init={init!r}: allowed values are {list(INITS)}")
    set_backbone_attributes(self, input_size=input_size, in_channels=in_channels,
                            patch_size=patch_size, hidden_size=hidden_size, num_heads=num_heads,
                            num_classes=num_classes, time_scale=time_scale, dtype=dtype,
                            remat=remat, scan_blocks=scan_blocks)
    self.x_embedder = layers.PatchEmbed(patch_size, in_channels, hidden_size, dtype=dtype,
                                        rngs=rngs)
    self.t_embedder = layers.TimestepEmbedder(hidden_size, rngs=rngs)
    self.y_embedder = layers.label_embedder(num_classes, hidden_size, rngs=rngs)  # None: unconditional
    self.s_embedder = (layers.TimestepEmbedder(hidden_size, rngs=rngs)
                       if second_time_embedder else None)
    self.guidance_embedder = (layers.TimestepEmbedder(hidden_size, rngs=rngs)
                              if guidance_embedder else None)
    norm_layer = layers.NORMS[norm]
    self.blocks = layers.blocks(
        lambda rngs: DiTBlock(hidden_size, num_heads, mlp_ratio, dtype=dtype, rngs=rngs,
                              norm=norm_layer, qk_norm=qk_norm, modulation_norm=modulation_norm),
        depth, rngs, scan=scan_blocks)
    self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, dtype=dtype,
                                  rngs=rngs, norm=norm_layer, modulation_norm=modulation_norm)
    if init.startswith("spectral"):
      spectral_init(self, rngs, embedders=init == "spectral")

  @property
  def second_time_embedder(self) -> bool:
    return self.s_embedder is not None

  def pos_embed(self):
    """The fixed [T, D] 2-D sin-cos position embedding (a numpy constant, not a parameter)."""
    return layers.get_2d_sincos_pos_embed(self.hidden_size, self.grid_size)

  def conditioning(self, t, y, s=None, guidance=None):
    """c = t_emb(time_scale·t) [+ y_emb(y)] [+ s_emb(time_scale·s)] [+ guidance_emb(time_scale·
    guidance)], float32 [B, D]."""
    if (self.guidance_embedder is None) != (guidance is None):
      raise ValueError("a DiT with a guidance embedder (model.guidance_embedder=True) takes "
                       "guidance=beta, one without takes none")
    if self.second_time_embedder and s is None:
      raise ValueError("this DiT has a second time embedder (second_time_embedder=True): "
                       "pass s (e.g. IMM's s or t - s)")
    if not self.second_time_embedder and s is not None:
      raise ValueError("s was given but this DiT has no second time embedder "
                       "(set model.second_time_embedder=True)")
    c = self.t_embedder(self.time_scale * jnp.asarray(t, jnp.float32))
    if self.y_embedder is not None:
      c = c + self.y_embedder(y)
    if s is not None:
      c = c + self.s_embedder(self.time_scale * jnp.asarray(s, jnp.float32))
    if guidance is not None:
      c = c + self.guidance_embedder(self.time_scale * jnp.asarray(guidance, jnp.float32))
    return c

  def __call__(self, x, t, y, s=None, guidance=None):
    c = parallel.constrain_batch(self.conditioning(t, y, s, guidance))
    x = self.x_embedder(x.astype(self.dtype))
    x = x + jnp.asarray(self.pos_embed(), x.dtype)
    x = layers.run_blocks(self.blocks, x, c, policy=self._remat_policy, use_remat=self._use_remat)
    x = self.final_layer(x, c)
    x = layers.unpatchify(x, self.patch_size, self.out_channels)
    return x.astype(jnp.float32)


def spectral_normal(key, shape, dtype=jnp.float32):
  """A normal matrix [fan_in, fan_out] (the last dim is fan_out, the others fan_in) divided by its
  largest singular value: TVM's init_type='spectral' (its xavier_normal scale cancels in the
  division)."""
  w = jax.random.normal(key, shape, jnp.float32)
  return (w / jnp.linalg.norm(w.reshape(-1, shape[-1]), ord=2)).astype(dtype)


def spectral_init(dit: "DiT", rngs: nnx.Rngs, embedders: bool = True) -> None:
  """Re-draw every kernel of `dit` with `spectral_normal` except the zero-initialised ones (adaLN
  modulations, the final linear), the label table and, with embedders=False, the time, stride and
  guidance embedders' MLPs (TVM's initialize_weights with time_specinit = embedders)."""
  for path, module in nnx.iter_graph(dit):
    if not isinstance(module, (nnx.Linear, nnx.Conv)):
      continue
    names = [str(p) for p in path]
    if "adaLN_modulation" in names or names[-2:] == ["final_layer", "linear"]:
      continue
    if not embedders and names[0] in EMBEDDERS:
      continue
    shape = module.kernel[...].shape
    if names[0] == "blocks" and dit.scan_blocks:   # [depth, in, out]: one matrix per block
      keys = jax.random.split(rngs.params(), shape[0])
      module.kernel.set_value(jax.vmap(lambda k: spectral_normal(k, shape[1:]))(keys))
    else:
      module.kernel.set_value(spectral_normal(rngs.params(), shape))


def dit_from_config(config, dtype, rngs: nnx.Rngs) -> DiT:
  """A DiT from config.model.* and config.data.{image_size, channels, num_classes} (checked by
  models.check), computing in `dtype`."""
  model = config.model
  depth, hidden_size, num_heads = SIZES[model.size]
  return DiT(input_size=config.data.image_size, in_channels=config.data.channels,
             patch_size=model.patch_size, hidden_size=hidden_size, depth=depth,
             num_heads=model.num_heads or num_heads, mlp_ratio=model.mlp_ratio,
             num_classes=config.data.num_classes,
             second_time_embedder=model.second_time_embedder, time_scale=model.time_scale,
             dtype=dtype, remat=model.remat, scan_blocks=model.scan_blocks, norm=model.norm,
             qk_norm=model.qk_norm, modulation_norm=model.modulation_norm,
             guidance_embedder=model.guidance_embedder, init=model.init, rngs=rngs)


def forward_macs(*, input_size: int, in_channels: int, patch_size: int, hidden_size: int,
                 depth: int, mlp_ratio: float = 4.0, second_time_embedder: bool = False) -> int:
  """Multiply-accumulates of one image's forward pass through DiT (matmuls only; attention
  included), the count of Peebles & Xie 2023, Table 4 (DiT-XL/2 at 32x32x4: 118.6 G).

  With T = (input_size / p)^2 tokens, D = hidden_size, r = mlp_ratio, per block:
    T·(3D² + D²)  qkv and out projections,   2·T²·D  QKᵀ and attention·V,
    T·2rD²        the MLP,                   6D²     adaLN's modulation (once per image);
  and around them: the patch embedding T·p²C·D, the final layer T·D·p²C + 2D², each time
  embedder 256·D + D². Training costs 3 forward passes' worth (forward + backward: 2 FLOPs
  per MAC each), so FLOPs per image = 6·MACs; IMM adds a forward target pass, 2·MACs.
  """
  tokens, d = (input_size // patch_size) ** 2, hidden_size
  patch = patch_size * patch_size * in_channels
  block = tokens * 4 * d * d + 2 * tokens * tokens * d + tokens * 2 * mlp_ratio * d * d + 6 * d * d
  embedders = (2 if second_time_embedder else 1) * (layers.FREQUENCY_EMBEDDING_SIZE * d + d * d)
  return int(depth * block + tokens * patch * d + tokens * d * patch + 2 * d * d + embedders)

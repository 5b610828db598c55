"""Independent references the tests (and benchmarks/sampler_order.py) compare against: written
from the papers' equations in float64 NumPy, sharing no code with the package.

  gaussian_model, exact_flow      the exact network and flow map of N(mu, diag s^2) data
  dit_forward, jit_forward        DiT.forward (facebookresearch/DiT models.py, learn_sigma=False)
                                  and JiT.forward (model_jit.py) from a flat {path: array} of
                                  Flax parameters
  perturb, call, flat_params      small helpers on NNX modules

For data N(mu, diag s^2) the exact denoiser is x_hat = mu + alpha·s^2/c·(x - alpha·mu),
n_hat = sigma·s_n^2/c·(x - alpha·mu), c = alpha^2 s^2 + sigma^2 s_n^2 (s_n = noise_std), handed
to a sampler in any parameterization via parameterization.from_x_eps; the exact flow map is
x_s = alpha_s·mu + sqrt(c_s/c_t)·(x_t - alpha_t·mu).

Import as `from tests import references` (the repository root on sys.path: pytest run from it,
or the benchmark's own sys.path entry).
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdiff_jax import parameterization


# --- the Gaussian oracle ---------------------------------------------------------------------

def gaussian_model(schedule, prediction, mu, s, *, noise_std=1.0, k=None, calls=None):
  """The exact network output for N(mu, diag s^2) data; `calls` (a list) records (batch, t)
  per call."""
  def model_fn(x, t):
    if calls is not None:  # eager only: (batch, time of the call)
      calls.append((x.shape[0], float(t[0])))
    tb = t[:, None]
    alpha, sigma = schedule.alpha(tb), schedule.sigma(tb)
    c = alpha**2 * s**2 + sigma**2 * noise_std**2
    x_hat = mu + alpha * s**2 / c * (x - alpha * mu)
    n_hat = sigma * noise_std**2 / c * (x - alpha * mu)
    return parameterization.from_x_eps(prediction, x_hat, n_hat, t, schedule, k=k,
                                       noise_std=noise_std)
  return model_fn


def exact_flow(schedule, x_t, t, s, mu, std, noise_std=1.0):
  """The probability-flow ODE's exact map from x_t at time t to time s, N(mu, diag std^2) data."""
  c = lambda u: schedule.alpha(u) ** 2 * std**2 + schedule.sigma(u) ** 2 * noise_std**2
  return schedule.alpha(s) * mu + np.sqrt(c(s) / c(t)) * (x_t - schedule.alpha(t) * mu)


# --- NNX helpers -----------------------------------------------------------------------------

def perturb(model, std, seed=1):
  """Add N(0, std^2) to every parameter (adaLN gates and the final layer become non-zero)."""
  rng = np.random.default_rng(seed)
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(
      lambda p: p + jnp.asarray(std * rng.normal(size=p.shape), p.dtype), params))
  return model


def call(model, *args):
  """model(*args) under jax.jit."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))(state, *args)


def flat_params(model) -> dict:
  """{path tuple: parameter array} of an NNX module."""
  return {path: v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# --- transformer pieces in float64 NumPy -----------------------------------------------------

def silu(v):
  return v / (1 + np.exp(-v))


def gelu_tanh(v):
  return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))


def layer_norm(v):
  """LayerNorm without affine parameters, eps 1e-6 (DiT's norm1 / norm2 / norm_final)."""
  return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-6)


def rms_norm(v, weight):
  """RMSNorm with a weight, eps 1e-6 (JiT's norms and q/k norms)."""
  return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + 1e-6) * weight


def sincos_pos_embed(dim, grid):
  """DiT's fixed 2-D sin-cos position embedding [grid^2, dim]: the first half of the channels
  encodes the column index, the second half the row; frequencies 1/10000^(i/(dim/4))."""
  quarter = dim // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter) / quarter)
  rows, cols = np.divmod(np.arange(grid * grid), grid)
  return np.concatenate([np.sin(cols[:, None] * omega), np.cos(cols[:, None] * omega),
                         np.sin(rows[:, None] * omega), np.cos(rows[:, None] * omega)], axis=1)


def rope(x, grid, prefix, theta=10000.0):
  """2-D RoPE by explicit 2x2 rotations of channel pairs: the first half by row·f_i, the second
  by col·f_i, f_i = theta^(-i/(head_dim/4)); the first `prefix` tokens are not rotated.
  x: [B, T, heads, head_dim]."""
  x = np.asarray(x, np.float64)
  out = x.copy()
  head_dim = x.shape[-1]
  quarter = head_dim // 4
  for token in range(prefix, x.shape[1]):
    row, col = divmod(token - prefix, grid)
    for half, position in ((0, row), (1, col)):
      for i in range(quarter):
        a = position * theta ** (-i / quarter)
        j = half * head_dim // 2 + 2 * i
        u, v = x[:, token, :, j], x[:, token, :, j + 1]
        out[:, token, :, j] = u * np.cos(a) - v * np.sin(a)
        out[:, token, :, j + 1] = u * np.sin(a) + v * np.cos(a)
  return out


def softmax_attention(q, k, v):
  """softmax(q k^T / sqrt(head_dim)) v over [B, T, heads, head_dim] -> [B, T, heads·head_dim]."""
  batch, count, heads, head_dim = q.shape
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, count, heads * head_dim)


def patchify(x, p):
  """[B, H, W, C] -> [B, (H/p)(W/p), p·p·C], each patch flattened in (p, q, c) order (the torch
  conv as a matmul: weight.view(D, -1))."""
  batch, height, width, channels = x.shape
  h, w = height // p, width // p
  patches = x.reshape(batch, h, p, w, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return patches.reshape(batch, h * w, p * p * channels)


def unpatchify(tokens, p, height, width, channels):
  """DiT's unpatchify: [B, (H/p)(W/p), p·p·C] -> [B, H, W, C]."""
  batch = tokens.shape[0]
  h, w = height // p, width // p
  out = tokens.reshape(batch, h, w, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return out.reshape(batch, height, width, channels)


class _Params:
  """Flat Flax parameters by path, in float64: P('blocks', 0, 'attn', 'qkv', 'kernel')."""

  def __init__(self, params):
    self.params = params

  def __call__(self, *path):
    return np.asarray(self.params[path], np.float64)

  def linear(self, v, *path):
    return v @ self(*path, "kernel") + self(*path, "bias")

  def time_embedder(self, name, time, time_scale):
    """TimestepEmbedder: mlp(cos/sin(time_scale·t·f_i)), 256 frequencies 10000^(-i/128)."""
    freqs = np.exp(-np.log(10000.0) * np.arange(128) / 128)
    args = time_scale * np.asarray(time, np.float64)[:, None] * freqs
    e = np.concatenate([np.cos(args), np.sin(args)], 1)
    return self.linear(silu(self.linear(e, name, "mlp", 0)), name, "mlp", 2)

  def adaln(self, c, *path, chunks):
    return np.split(self.linear(silu(c), *path, "adaLN_modulation", 1), chunks, axis=1)

  @property
  def depth(self):
    return len({path[1] for path in self.params if path[0] == "blocks"})


def dit_forward(params, x, t, y, s, *, patch, heads, time_scale):
  """DiT.forward (models.py, learn_sigma=False) in float64 NumPy, from the paper's equations;
  s: the second time (IMM's s-embedder) or None."""
  P = _Params(params)
  x = np.asarray(x, np.float64)
  batch, height, width, channels = x.shape
  kernel = P("x_embedder", "proj", "kernel")
  tokens = patchify(x, patch) @ kernel.reshape(-1, kernel.shape[-1])
  tokens = tokens + P("x_embedder", "proj", "bias")
  count, dim = tokens.shape[1:]
  tokens = tokens + sincos_pos_embed(dim, height // patch)
  c = P.time_embedder("t_embedder", t, time_scale)
  c = c + P("y_embedder", "embedding_table", "embedding")[np.asarray(y)]
  if s is not None:
    c = c + P.time_embedder("s_embedder", s, time_scale)
  for i in range(P.depth):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = P.adaln(c, "blocks", i,
                                                                             chunks=6)
    v = layer_norm(tokens) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    qkv = P.linear(v, "blocks", i, "attn", "qkv").reshape(batch, count, 3, heads, dim // heads)
    attn = softmax_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    tokens = tokens + gate_msa[:, None] * P.linear(attn, "blocks", i, "attn", "proj")
    v = layer_norm(tokens) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    v = P.linear(gelu_tanh(P.linear(v, "blocks", i, "mlp", "fc1")), "blocks", i, "mlp", "fc2")
    tokens = tokens + gate_mlp[:, None] * v
  shift, scale = P.adaln(c, "final_layer", chunks=2)
  v = layer_norm(tokens) * (1 + scale[:, None]) + shift[:, None]
  out = P.linear(v, "final_layer", "linear")
  return unpatchify(out, patch, height, width, channels)


def jit_forward(params, x, t, y, *, patch, heads, in_context_len, in_context_start, time_scale):
  """model_jit.py JiT.forward in float64 NumPy, written from the module's equations: bottleneck
  patch embedding, RMSNorm, q/k norms, 2-D RoPE, SwiGLU, in-context class tokens."""
  P = _Params(params)
  x = np.asarray(x, np.float64)
  batch, height, width, channels = x.shape
  grid = height // patch
  y_emb = P("y_embedder", "embedding_table", "embedding")[np.asarray(y)]
  c = P.time_embedder("t_embedder", t, time_scale) + y_emb
  proj1 = P("x_embedder", "proj1", "kernel")
  tokens = patchify(x, patch) @ proj1.reshape(-1, proj1.shape[-1])
  tokens = tokens @ P("x_embedder", "proj2", "kernel")[0, 0] + P("x_embedder", "proj2", "bias")
  dim = tokens.shape[-1]
  tokens = tokens + sincos_pos_embed(dim, grid)
  for i in range(P.depth):
    if i == in_context_start:
      tokens = np.concatenate([y_emb[:, None] + P("in_context_posemb"), tokens], axis=1)
    prefix = in_context_len if i >= in_context_start else 0
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = P.adaln(c, "blocks", i,
                                                                             chunks=6)
    v = rms_norm(tokens, P("blocks", i, "norm1", "scale"))
    v = v * (1 + scale_msa[:, None]) + shift_msa[:, None]
    count = tokens.shape[1]
    qkv = P.linear(v, "blocks", i, "attn", "qkv").reshape(batch, count, 3, heads, dim // heads)
    q = rope(rms_norm(qkv[:, :, 0], P("blocks", i, "attn", "q_norm", "scale")), grid, prefix)
    k = rope(rms_norm(qkv[:, :, 1], P("blocks", i, "attn", "k_norm", "scale")), grid, prefix)
    attn = softmax_attention(q, k, qkv[:, :, 2])
    tokens = tokens + gate_msa[:, None] * P.linear(attn, "blocks", i, "attn", "proj")
    v = rms_norm(tokens, P("blocks", i, "norm2", "scale"))
    v = v * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    x1, x2 = np.split(P.linear(v, "blocks", i, "mlp", "w12"), 2, axis=-1)
    tokens = tokens + gate_mlp[:, None] * P.linear(silu(x1) * x2, "blocks", i, "mlp", "w3")
  tokens = tokens[:, in_context_len:]
  shift, scale = P.adaln(c, "final_layer", chunks=2)
  v = rms_norm(tokens, P("final_layer", "norm_final", "scale"))
  v = v * (1 + scale[:, None]) + shift[:, None]
  return unpatchify(P.linear(v, "final_layer", "linear"), patch, height, width, channels)

"""k-Diff's dimensionality experiment: the learned k against D/(D+d) (docs/objectives/kdiff.md, "Checks").

Data x = A·z on a random d-dimensional subspace of R^D (A: D x d with orthonormal columns,
z ~ N(0, I_d), so E||x||^2 = d against E||n||^2 = D for the noise). A denoiser predicts
u = k·x - (1-k)·n on the rectified-flow interpolant x_t = (1-t)·x + t·n, t ~ U(0, 1), and is
trained jointly with w_k (k = sigmoid(w_k)) by Adam (cosine-decayed learning rate) on the
k-Diff loss of kdiff_jax/objectives/kdiff.py (velocity space, clamp 0.05, stop-gradient
target). Denoisers:

  linear  u_hat = (W_0 + t·W_1)·x_t + b        (linear in x_t, affine in t)
  mlp     u_hat = MLP([x_t, t]), two SiLU hidden layers of `width`

(A linear map without any time input is no use here: in velocity space its best loss is
*largest* at k = 1/2 when D = d, so k runs away to 0 or 1; affine in t, k = 1/2 is the minimum
at D = d. Derivation: per direction v_hat = B(t)·x_t/Delta, a least-squares fit in B.)

Theory (Jin & Wang 2026): k* = D/(D+d), the k that minimises E||k·x - (1-k)·n||^2. It is
exact for a time-independent linear model u_hat = W·x_t fitted in u space with k in the
target (d·(k^2 - k)/2 + (D-d)·(1-k)^2/4 is minimal at D/(D+d)); with k-Diff's velocity-space
loss and stop-gradient target the trends are the same: D = d gives 1/2 by the x <-> n,
t <-> 1-t symmetry, D >> d pushes k to 1 (x-prediction: the D - d empty directions are
trivially 0 in x). For the linear model here the least-squares profile puts the optimum at
0.50, 0.63 and > 0.99 for D/d = 1, 2 and >= 4, with two local minima (near 0.8 and near 1)
for D/d around 3 to 4, so the two starts can disagree there. Printed: D, d, model width, D/(D+d), the
learned k from k0 = 0.12 and from k0 = 0.88, their mean minus D/(D+d), and the final loss
(mean of the last 10% of steps, averaged over the two starts).

  python benchmarks/kdiff_dimension.py [--steps 8000] [--width 16] [--settings 64x64,64x4]
"""
import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import optax  # noqa: E402

from kdiff_jax import parameterization, schedules  # noqa: E402
from kdiff_jax.objectives import kdiff  # noqa: E402

SCHEDULE = schedules.RectifiedFlow()
MIN_DIVISOR = 0.05
# (D, d): D/d = 1 at two sizes, then d = 4 with D growing (with (64, 4) below), then D = 64
# with d shrinking. All have D >= 2·width for the default MLP width 16: with more capacity than
# that (e.g. D = d = 16) the MLP fits both ends well, the loss barely depends on k and k stays
# near its start within these steps (try --settings 16x16,8x4).
SETTINGS = ((32, 32), (64, 64), (16, 4), (32, 4), (64, 32), (64, 16), (64, 8), (64, 4), (64, 2))


def subspace(key, ambient, intrinsic):
  """A [D, d] matrix with orthonormal columns spanning a random d-dim subspace."""
  q, _ = jnp.linalg.qr(jax.random.normal(key, (ambient, intrinsic), jnp.float32))
  return q


def init_denoiser(key, model, ambient, width):
  if model == "linear":
    zeros = jnp.zeros((ambient, ambient), jnp.float32)
    return {"w0": zeros, "w1": zeros, "b": jnp.zeros((ambient,), jnp.float32)}
  sizes = (ambient + 1, width, width, ambient)
  keys = jax.random.split(key, len(sizes) - 1)
  layers = [{"w": jax.random.normal(k, (m, n), jnp.float32) / math.sqrt(m),
             "b": jnp.zeros((n,), jnp.float32)} for k, m, n in zip(keys, sizes[:-1], sizes[1:])]
  layers[-1]["w"] = jnp.zeros_like(layers[-1]["w"])  # starts at u_hat = 0, like the DiT
  return {"layers": layers}


def denoise(params, x_t, t):
  if "w0" in params:
    return x_t @ params["w0"] + t[:, None] * (x_t @ params["w1"]) + params["b"]
  h = jnp.concatenate([x_t, t[:, None]], axis=1)
  *hidden, last = params["layers"]
  for layer in hidden:
    h = jax.nn.silu(h @ layer["w"] + layer["b"])
  return h @ last["w"] + last["b"]


def train(ambient, intrinsic, model, width, k0, *, steps, batch_size, learning_rate, seed):
  """(learned k, final loss) of one run; the subspace depends on the seed only."""
  key_a, key_init, key_run = jax.random.split(jax.random.key(seed), 3)
  basis = subspace(key_a, ambient, intrinsic)
  kd = ml_collections.ConfigDict(dict(learnable=True, k_init=k0, w_k_scale=1.0, time_dependent=False))
  params = {"net": init_denoiser(key_init, model, ambient, width), **kdiff.initial_params(kd)}
  optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

  def loss_fn(params, key):
    key_z, key_n, key_t = jax.random.split(key, 3)
    x = jax.random.normal(key_z, (batch_size, intrinsic), jnp.float32) @ basis.T
    n = jax.random.normal(key_n, (batch_size, ambient), jnp.float32)
    t = jax.random.uniform(key_t, (batch_size,), jnp.float32)
    x_t = parameterization.interpolate(x, n, t, SCHEDULE)
    k = kdiff.k_of(params, t, kd)
    output = denoise(params["net"], x_t, t)
    return jnp.mean(kdiff.per_example_loss(output, x, n, x_t, t, k, SCHEDULE, MIN_DIVISOR))

  def step(carry, key):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  @jax.jit
  def run(params):
    keys = jax.random.split(key_run, steps)
    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), keys)
    return kdiff.k_of(params, None, kd), jnp.mean(losses[-max(steps // 10, 1):])

  k, loss = run(params)
  return float(k), float(loss)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=8000)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--learning_rate", type=float, default=1e-2)
  parser.add_argument("--width", type=int, default=16, help="MLP hidden width")
  parser.add_argument("--models", default="linear,mlp")
  parser.add_argument("--settings", default=",".join(f"{D}x{d}" for D, d in SETTINGS),
                      help="comma-separated DxD_intrinsic pairs")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  print(f"k-Diff dimension experiment: {args.steps} Adam steps (lr {args.learning_rate}), batch "
        f"{args.batch_size}, t ~ U(0, 1), clamp {MIN_DIVISOR}")
  print(f"{'model':>6} {'D':>3} {'d':>3} {'width':>5} {'D/(D+d)':>8} {'k(0.12)':>8} {'k(0.88)':>8} "
        f"{'k-D/(D+d)':>9} {'loss':>8}")
  for model in args.models.split(","):
    width = args.width if model == "mlp" else 0
    for setting in args.settings.split(","):
      ambient, intrinsic = (int(v) for v in setting.split("x"))
      start = time.time()
      runs = [train(ambient, intrinsic, model, width, k0, steps=args.steps,
                    batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed)
              for k0 in (0.12, 0.88)]
      theory = ambient / (ambient + intrinsic)
      (k_low, loss_low), (k_high, loss_high) = runs
      mean_k = 0.5 * (k_low + k_high)
      print(f"{model:>6} {ambient:>3} {intrinsic:>3} {width or '-':>5} {theory:>8.3f} {k_low:>8.3f} "
            f"{k_high:>8.3f} {mean_k - theory:>+9.3f} {0.5 * (loss_low + loss_high):>8.4f}"
            f"   ({time.time() - start:.0f}s)", flush=True)


if __name__ == "__main__":
  main()

"""iMF's loss from fixed draws against an independent float64 NumPy implementation of the recipe
(docs/objectives/meanflow.md, "iMF"), with an analytic two-headed network and du/dt by central
differences: both our cheaper step and the official full-batch one, with and without the v head.

The reference is written from the formulas, not from objectives/imf.py: it computes v_c once at
the windowed ω_w on every row (the official step's two passes on r = t rows are the same there,
which this checks too), the JVP by finite differences along (v_c, 1, 0), and both heads' losses.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import imf_digits
from kdiff_jax.objectives import imf

CLASSES = 10
_RNG = np.random.default_rng(5)
A, B, C = (_RNG.normal(size=CLASSES + 1) for _ in range(3))


def _heads(xp, z, t, h, omega, t_min, t_max, y):
  """(u, v): smooth in every input, each head its own function, both reading every condition."""
  col = lambda a: a[:, None, None, None]
  t_, h_, g_ = col(t), col(h), col(1.0 - 1.0 / omega)
  width = col(t_max - t_min)
  u = (col(xp.asarray(A)[y]) * z * (1 + t_) + col(xp.asarray(B)[y]) * h_
       + 0.3 * xp.tanh(z) * h_ * t_ + 0.4 * g_ * z + 0.2 * width * h_)
  v = col(xp.asarray(C)[y]) * z * (1 + 0.5 * t_) + 0.5 * g_ * xp.tanh(z) + 0.1 * width * z + 0.2 * h_
  return u, v


def analytic_apply(net_params, z, t, labels, h, *, guidance, interval, v_head=False, u_head=True):
  """The objective's network call (models/imf_dit.py's keywords) on `_heads`, in float32."""
  del net_params
  u, v = _heads(jnp, z, t, h, guidance, interval[0], interval[1], labels)
  if v_head and u_head:
    return u, v
  return v if v_head else u


def reference_losses(x, labels, d, *, aux, p, c):
  """iMF's per-example (loss, L_u, L_v) in float64 NumPy (d: the draws as float64 / int arrays)."""
  col = lambda a: a[:, None, None, None]
  t, r, e, omega = d["t"], d["r"], d["noise"], d["omega"]
  z, v = (1 - col(t)) * x + col(t) * e, e - x
  zero, one = np.zeros_like(t), np.ones_like(t)
  head = 1 if aux else 0   # without the v head, the instantaneous velocity is u at h = 0
  velocity = lambda w, y: _heads(np, z, t, zero, w, zero, one, y)[head]
  omega_w = np.where((t >= d["t_min"]) & (t <= d["t_max"]), omega, 1.0)
  v_c, v_u = velocity(omega_w, labels), velocity(one, np.full_like(labels, CLASSES))
  v_g = np.where(col(d["dropped"]), v, v + col(1 - 1 / omega_w) * (v_c - v_u))
  train = lambda z_, t_: _heads(np, z_, t_, t_ - r, omega, d["t_min"], d["t_max"], d["labels"])
  eps = 1e-6
  du_dt = (train(z + eps * v_c, t + eps)[0] - train(z - eps * v_c, t - eps)[0]) / (2 * eps)
  u, v_head = train(z, t)
  weight = lambda error: error / (error + c) ** p
  error_u = np.sum((u + col(t - r) * du_dt - v_g) ** 2, axis=(1, 2, 3))
  error_v = np.sum((v_head - v_g) ** 2, axis=(1, 2, 3))
  return weight(error_u) + (weight(error_v) if aux else 0.0), error_u, error_v


@pytest.mark.parametrize("aux_v_head", [True, False], ids=["v_head", "no_v_head"])
@pytest.mark.parametrize("full_batch_jvp", [False, True], ids=["ours", "official"])
def test_loss_from_fixed_draws_matches_a_float64_reference(full_batch_jvp, aux_v_head):
  config = imf_digits.get_config()
  config.objective.label_dropout = 0.25
  config.objective.imf.full_batch_jvp = full_batch_jvp
  config.objective.imf.aux_v_head = aux_v_head
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 4, 4, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, CLASSES, size=32))
  draws = imf.draw(jax.random.key(3), x, labels, config)
  ours = imf.make_example_losses(config, analytic_apply)(None, x, labels, draws)
  as_np = {k: np.asarray(v, np.float64 if np.asarray(v).dtype.kind == "f" else None)
           for k, v in vars(draws).items()}
  loss, error_u, error_v = reference_losses(np.asarray(x, np.float64), np.asarray(labels), as_np,
                              aux=aux_v_head, p=config.objective.imf.adaptive_p,
                              c=config.objective.imf.adaptive_c)
  # The draws exercise every branch: dropped rows, rows outside their interval, r = t and r < t.
  t, r = as_np["t"], as_np["r"]
  outside = (t < as_np["t_min"]) | (t > as_np["t_max"])
  assert as_np["dropped"].any() and outside.any() and (t == r).any() and (t > r).any()
  # The errors themselves: the adaptive weight L / (L + c) is near 1 wherever L >> c.
  np.testing.assert_allclose(ours["error_u"], error_u, rtol=3e-4)
  if aux_v_head:
    np.testing.assert_allclose(ours["error_v"], error_v, rtol=3e-4)
  np.testing.assert_allclose(ours["loss"], loss, rtol=3e-4)

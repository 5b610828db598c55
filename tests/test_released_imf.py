"""Released iMF checkpoints (Lyy-iiis/imeanflow `iMF-{B,M,L,XL}-2`, "full" and "inference"):
small files in the release's exact layouts, read, imported, and checked against an independent
float64 NumPy forward of the official architecture and against the torch export's sampler.

The files: `official_net` builds the parameter tree that the official Linen `imfDiT`
(models/imfDiT.py, models/embedder.py, models/torch_models.py) creates: its module names and
nesting (TorchLinear's `_flax_linear`, TorchEmbedding's `_flax_embedding`, nn.Sequential's
`layers_i`, list attributes `shared_blocks_i`, RMSNorm's `kernel`), kernels [in, out], the
patch conv HWIO, float32; "full" files are a flax TrainState (step, params, opt_state of
optax.adamw, ema_params; params = {'net': imfDiT}) as utils/trainstate_util.py builds it, the
"inference" ones {'step', 'ema_params'} of the eval model (no v_heads_i). Both are written by
flax.training.checkpoints.save_checkpoint, as an orbax directory (flax_use_orbax_checkpointing)
and as flax's legacy msgpack file.

`official_forward` is written from the official module definitions, in float64 NumPy, on the
official parameter tree itself (none of the importer's renaming).
"""
import os
from typing import Any

import flax
import jax
import numpy as np
import optax
import pytest
from flax.training import checkpoints as flax_checkpoints
from flax.training import train_state

from kdiff_jax import objectives, parallel, sampling, state
from kdiff_jax.export import checkpoints, convert, pretrained
from kdiff_jax.models import imf_dit
from tests import references
from tests.test_cli import run_main

torch = pytest.importorskip("torch")

CLASSES, HIDDEN, HEADS, PATCH, CHANNELS, IMAGE = 10, 64, 2, 2, 4, 8   # imf_dit size T
SHARED, HEAD = 1, 1
TOKENS = (("class_tokens", 8), ("omega_tokens", 4), ("t_min_tokens", 2), ("t_max_tokens", 2),
          ("time_tokens", 4))


# --- the official tree and files ------------------------------------------------------------------

def official_net(seed: int, *, v_heads: bool, hidden: int = HIDDEN):
  """imfDiT's params (the Linen module names and nesting), random float32 values."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape, std=1.0: (std * rng.normal(size=shape)).astype(np.float32)
  linear = lambda fan_in, fan_out, bias=False: {"_flax_linear": dict(
      kernel=normal(fan_in, fan_out, std=fan_in ** -0.5),
      **({"bias": normal(fan_out, std=0.1)} if bias else {}))}
  norm = lambda dim: {"kernel": 1 + normal(dim, std=0.1)}
  embedder = lambda: {"mlp": {"layers_0": linear(256, hidden, True),
                              "layers_2": linear(hidden, hidden, True)}}
  mlp_hidden = int(hidden * 8 / 3)

  def block():
    return {"norm1": norm(hidden), "norm2": norm(hidden),
            "attn": {"q_proj": linear(hidden, hidden), "k_proj": linear(hidden, hidden),
                     "v_proj": linear(hidden, hidden), "out_proj": linear(hidden, hidden),
                     "q_norm": norm(hidden // HEADS), "k_norm": norm(hidden // HEADS)},
            "mlp": {"w1": linear(hidden, mlp_hidden), "w3": linear(hidden, mlp_hidden),
                    "w2": linear(mlp_hidden, hidden)},
            "attn_scale": normal(hidden, std=0.5), "mlp_scale": normal(hidden, std=0.5)}

  final = lambda: {"norm": norm(hidden),
                   "linear": linear(hidden, PATCH * PATCH * CHANNELS, True)}
  net = {"x_embedder": {"proj": {"kernel": normal(PATCH, PATCH, CHANNELS, hidden, std=0.3),
                                 "bias": normal(hidden, std=0.1)}},
         "h_embedder": embedder(), "omega_embedder": embedder(),
         "cfg_t_start_embedder": embedder(), "cfg_t_end_embedder": embedder(),
         "y_embedder": {"embedding_table": {"_flax_embedding": {
             "embedding": normal(CLASSES + 1, hidden, std=hidden ** -0.5)}}},
         "u_final_layer": final(), "v_final_layer": final()}
  net.update({name: normal(count, hidden, std=hidden ** -0.5) for name, count in TOKENS})
  for stack, count in (("shared_blocks", SHARED), ("u_heads", HEAD),
                       ("v_heads", HEAD if v_heads else 0)):
    net.update({f"{stack}_{i}": block() for i in range(count)})
  return net


class TrainState(train_state.TrainState):
  """utils/trainstate_util.py's TrainState: flax's, plus the EMA params."""
  ema_params: Any


def save(directory, target, step: int, orbax: bool) -> str:
  """flax.training.checkpoints.save_checkpoint as an orbax directory or a legacy msgpack file."""
  previous = flax.config.flax_use_orbax_checkpointing
  flax.config.update("flax_use_orbax_checkpointing", orbax)
  try:
    return flax_checkpoints.save_checkpoint(os.path.abspath(directory), target, step)
  finally:
    flax.config.update("flax_use_orbax_checkpointing", previous)


def full_state(raw, ema, step):
  state_ = TrainState.create(apply_fn=None, params={"net": raw}, ema_params={"net": ema},
                             tx=optax.adamw(1e-4, b2=0.95, weight_decay=0.0))
  return state_.replace(step=step)


@pytest.fixture(scope="module")
def nets():
  return dict(raw=official_net(0, v_heads=True), ema=official_net(1, v_heads=True),
              eval_ema=official_net(2, v_heads=False))


@pytest.fixture(scope="module")
def files(nets, tmp_path_factory):
  """{(layout, form): the checkpoint's path} in both layouts and both forms."""
  root = tmp_path_factory.mktemp("imf_release")
  paths = {}
  for form in ("orbax", "msgpack"):
    orbax = form == "orbax"
    paths["full", form] = save(root / f"full_{form}", full_state(nets["raw"], nets["ema"], 320),
                               320, orbax)
    paths["inference", form] = save(root / f"inference_{form}",
                                    {"step": 640, "ema_params": {"net": nets["eval_ema"]}},
                                    640, orbax)
  assert os.path.isdir(paths["full", "orbax"]) and os.path.isfile(paths["full", "msgpack"])
  assert os.path.exists(os.path.join(paths["inference", "orbax"], "_METADATA"))
  return paths


# --- the official network in float64 NumPy --------------------------------------------------------

def _timestep(t, dim=256, max_period=10000.0):
  freqs = np.exp(-np.log(max_period) * np.arange(dim // 2) / (dim // 2))
  args = np.asarray(t, np.float64)[:, None] * freqs
  return np.concatenate([np.cos(args), np.sin(args)], axis=-1)


def _rope(x):
  """1-D RoPE over the whole sequence: consecutive channel pairs as complex numbers, times
  exp(i·p·θ^(-2j/d)) at position p (precompute_rope_freqs, apply_rotary_pos_emb)."""
  head_dim = x.shape[-1]
  freqs = 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
  rotation = np.exp(1j * np.arange(x.shape[1])[:, None] * freqs)[None, :, None]
  pairs = (x[..., 0::2] + 1j * x[..., 1::2]) * rotation
  return np.stack([pairs.real, pairs.imag], axis=-1).reshape(x.shape)


def official_forward(net, x, h, omega, t_min, t_max, y, head: str):
  """imfDiT.__call__'s u (head 'u') or v (head 'v') in float64, on the official tree."""
  f64 = lambda a: np.asarray(a, np.float64)
  dense = lambda v, m: v @ f64(m["_flax_linear"]["kernel"]) + (
      f64(m["_flax_linear"]["bias"]) if "bias" in m["_flax_linear"] else 0.0)
  embed = lambda m, t: dense(references.silu(dense(_timestep(t), m["mlp"]["layers_0"])),
                             m["mlp"]["layers_2"])
  norm = lambda v, m: references.rms_norm(v, f64(m["kernel"]))
  kernel = f64(net["x_embedder"]["proj"]["kernel"])
  patches = references.patchify(f64(x), PATCH) @ kernel.reshape(-1, kernel.shape[-1])
  patches = patches + f64(net["x_embedder"]["proj"]["bias"])
  conditions = {"class_tokens": f64(net["y_embedder"]["embedding_table"]["_flax_embedding"]
                                    ["embedding"])[y],
                "omega_tokens": embed(net["omega_embedder"], 1 - 1 / f64(omega)),
                "t_min_tokens": embed(net["cfg_t_start_embedder"], t_min),
                "t_max_tokens": embed(net["cfg_t_end_embedder"], t_max),
                "time_tokens": embed(net["h_embedder"], h)}
  seq = np.concatenate([f64(net[name])[None] + conditions[name][:, None] for name, _ in TOKENS]
                       + [patches], axis=1)
  batch, count, _ = seq.shape

  def block(seq, b):
    heads = lambda v: v.reshape(batch, count, HEADS, -1)
    a = b["attn"]
    v = norm(seq, b["norm1"])
    q = _rope(norm(heads(dense(v, a["q_proj"])), a["q_norm"]))
    k = _rope(norm(heads(dense(v, a["k_proj"])), a["k_norm"]))
    attn = references.softmax_attention(q, k, heads(dense(v, a["v_proj"])))
    seq = seq + dense(attn, a["out_proj"]) * f64(b["attn_scale"])
    v = norm(seq, b["norm2"])
    mlp = dense(references.silu(dense(v, b["mlp"]["w1"])) * dense(v, b["mlp"]["w3"]),
                b["mlp"]["w2"])
    return seq + mlp * f64(b["mlp_scale"])

  for i in range(SHARED):
    seq = block(seq, net[f"shared_blocks_{i}"])
  for i in range(HEAD):
    seq = block(seq, net[f"{head}_heads_{i}"])
  final = net[f"{head}_final_layer"]
  out = dense(norm(seq[:, sum(c for _, c in TOKENS):], final["norm"]), final["linear"])
  return references.unpatchify(out, PATCH, *x.shape[1:])


# --- tests ----------------------------------------------------------------------------------------

def _read(path):
  state_dict, config = pretrained.read(str(path))
  config.data.image_size = IMAGE   # the file does not store it (released: 32)
  return state_dict, config


def test_every_layout_reads_into_the_torch_twin_with_its_settings(files, nets):
  from kdiff_jax.export import torch_load
  read = {key: _read(path) for key, path in files.items()}
  for (layout, form), (state_dict, config) in read.items():
    assert (config.model.name, config.model.size, config.model.patch_size) == ("imf_dit", "T", 2)
    assert (config.data.channels, config.data.num_classes) == (CHANNELS, CLASSES)
    assert config.objective.name == "imf" and config.sampling.method == "mean_flow"
    assert (config.sampling.num_steps, config.sampling.guidance_scale,
            tuple(config.sampling.guidance_interval)) == (1, 8.0, (0.4, 0.65))
    assert config.data.latent_scale == 1.0 and config.data.latent_channel_std[0] == 4.85503674
    twin = torch_load.build(convert.model_spec(config))
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  for form in ("orbax", "msgpack"):
    full, _ = read["full", form]
    ema = nets["ema"]["v_heads_0"]["attn"]["q_proj"]["_flax_linear"]["kernel"]
    np.testing.assert_array_equal(full["v_heads.0.attn.q_proj.weight"], ema.T)
    inference, _ = read["inference", form]
    for key in inference:
      if key.startswith(("v_heads.", "v_final_layer.")):
        np.testing.assert_array_equal(inference[key], inference["u" + key[1:]])
    for key, value in read["full", "orbax"][0].items():
      np.testing.assert_array_equal(full[key], value)


@pytest.mark.parametrize("layout, form", [("full", "orbax"), ("inference", "msgpack")])
def test_the_imported_network_is_the_official_one(files, nets, layout, form):
  """The EMA weights, u (and v where the file has the v head) against the float64 forward."""
  state_dict, config = _read(files[layout, form])
  net_params = checkpoints.import_state_dict(state_dict, config)
  official = nets["ema"] if layout == "full" else nets["eval_ema"]
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4, IMAGE, IMAGE, CHANNELS)).astype(np.float32)
  y = np.array([0, 3, 9, CLASSES])
  h = np.array([0.0, 0.3, 0.7, 1.0], np.float32)
  omega = np.array([1.0, 2.0, 8.0, 4.5], np.float32)
  t_min, t_max = np.array([0.0, 0.1, 0.4, 0.2], np.float32), np.array([1.0, 0.6, 0.65, 0.9],
                                                                       np.float32)
  apply = jax.jit(state.build_model(config).apply, static_argnames=("v_head",))
  u, v = apply({"net": net_params}, x, np.ones(4, np.float32), y, s=h, guidance=omega,
               interval=(t_min, t_max), v_head=True)
  expected_u = official_forward(official, x, h, omega, t_min, t_max, y, "u")
  expected_v = official_forward(official, x, h, omega, t_min, t_max, y,
                                "v" if layout == "full" else "u")
  assert np.std(expected_u) > 0.1
  assert np.std(expected_v - expected_u) > 0.1 if layout == "full" else True
  np.testing.assert_allclose(u, expected_u, rtol=0, atol=1e-5)
  np.testing.assert_allclose(v, expected_v, rtol=0, atol=1e-5)
  config.model.scan_blocks = True   # the stacked layout holds the same blocks
  scanned = convert.per_block(checkpoints.import_state_dict(state_dict, config),
                              stacks=imf_dit.STACKS)
  jax.tree.map(np.testing.assert_array_equal, scanned, net_params)


def test_imported_samples_match_the_torch_export(files, tmp_path):
  """1, 2, 4 steps of z <- z - (t - r)·u: the JAX sampler on the imported workdir against the
  torch export's iMF sampler (torch_sampling) on the export's strict load."""
  from kdiff_jax.export import torch_load, torch_sampling
  state_dict, config = _read(files["inference", "orbax"])
  workdir = str(tmp_path / "run")
  checkpoints.init_workdir(config, workdir, checkpoints.import_state_dict(state_dict, config))
  paths = checkpoints.export_checkpoint(config, workdir)
  model, meta = torch_load.load(paths["json"])
  assert meta["sampling"]["guidance_scale"] == 8.0
  assert meta["sampling"]["guidance_interval"] == [0.4, 0.65]
  weights = state.Weights(config, parallel.make_mesh(config.mesh))
  params, step = weights.restore(workdir, use_ema=True)
  assert step == 0
  rng = np.random.default_rng(4)
  noise = rng.normal(size=(4, IMAGE, IMAGE, CHANNELS)).astype(np.float32)
  labels = np.array([1, 5, 9, CLASSES])
  for num_steps in (1, 2, 4):
    config.sampling.num_steps = num_steps
    sample = sampling.build(config, objectives.describe(config), weights.model.apply)
    got = np.asarray(jax.jit(sample)(params, noise, labels, jax.random.key(0)))
    expected = torch_sampling.sample(model, meta, torch.from_numpy(noise).permute(0, 3, 1, 2),
                                     torch.from_numpy(labels), num_steps=num_steps)
    expected = expected.permute(0, 2, 3, 1).numpy()
    assert np.std(expected - noise) > 0.1
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=f"{num_steps} steps")


def test_other_layouts_and_sizes_are_refused_in_one_line(nets, tmp_path):
  wrong = save(tmp_path / "wrong", {"step": 1, "model": {"net": nets["eval_ema"]}}, 1, False)
  with pytest.raises(ValueError, match=r"fields \['model', 'step'\]; iMF's TrainState "
                                       r"checkpoints hold ema_params and step"):
    pretrained.read(wrong)
  no_net = save(tmp_path / "no_net", {"step": 1, "ema_params": nets["eval_ema"]}, 1, False)
  with pytest.raises(ValueError, match=r"ema_params holds \['cfg_t_end_embedder', .*iMF's hold "
                                       r"\{'net'"):
    pretrained.read(no_net)
  odd = save(tmp_path / "odd", {"step": 1, "ema_params": {"net": official_net(
      5, v_heads=False, hidden=96)}}, 1, False)
  with pytest.raises(ValueError, match=r"1 shared \+ 1 head blocks, width 96, 2 heads .* no "
                                       r"imf_dit size matches"):
    pretrained.read(odd)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="is a directory without a flax checkpoint"):
    pretrained.read(str(tmp_path / "empty"))


def test_main_imports_a_checkpoint_then_samples_and_trains_with_no_config(files, tmp_path):
  workdir = str(tmp_path / "run")
  imported = run_main("--mode=import", f"--import_from={os.path.dirname(files['full', 'orbax'])}",
                      f"--workdir={workdir}", f"--config.data.image_size={IMAGE}")
  assert imported.returncode == 0, imported.stderr[-2000:]
  assert "importing ema_params" in imported.stderr + imported.stdout
  sampled = run_main("--mode=sample", f"--workdir={workdir}")
  assert sampled.returncode == 0, sampled.stderr[-2000:]
  with np.load(os.path.join(workdir, "samples_step0_mean_flow_1steps_w8.npz")) as archive:
    images = archive[archive.files[0]]
  assert images.shape[1:] == (IMAGE, IMAGE, CHANNELS) and np.all(np.isfinite(images))
  trained = run_main("--mode=train", f"--workdir={workdir}", "--config.training.num_steps=1",
                     "--config.training.batch_size=4", "--allow_config_change=training.batch_size")
  assert trained.returncode == 0, trained.stderr[-2000:]
  assert "starting at step 0; 1 steps to go" in trained.stderr + trained.stdout
  assert "a fresh optimizer state" in trained.stderr + trained.stdout

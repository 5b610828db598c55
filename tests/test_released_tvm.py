"""Released TVM pickles (lumalabs/tvm): read without running them, the config they carry, and the
JAX network and sampler against an independent PyTorch implementation of the authors' DiT and
sampler, and against the torch export.

tests/released/tvm/ holds stand-ins with lumalabs/tvm's layout (training.wrapper.TVMWrapper,
training.dit's DiT and parts, timm's PatchEmbed / Mlp, omegaconf's DictConfig; EDM's persistence
pickle from tests/released/torch_utils): a module pickled through them stores its module's
source, which `pickle.load` executes. Here the stored source writes a file and raises.
"""
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

from kdiff_jax import objectives, sampling, state
from kdiff_jax.export import checkpoints, pickles, pretrained, released_tvm

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASED = os.path.join(ROOT, "tests", "released")
STAND_INS = os.path.join(RELEASED, "tvm")
PACKAGES = ("training", "torch_utils", "timm", "omegaconf")
PAYLOAD = "open({marker!r}, 'w').write('executed')\nraise RuntimeError('stored source ran')\n"
CLASSES = 10
# DiT size T's depth and width with 4 heads (T's own is 2): the heads must come from the file.
TINY = dict(patch_size=2, hidden_size=64, depth=2, num_heads=4)


def _forget():
  for name in [n for n in sys.modules if n.split(".")[0] in PACKAGES]:
    del sys.modules[name]


@pytest.fixture(scope="module")
def tvm():
  """The stand-in modules (tests/released/tvm first on sys.path, then tests/released)."""
  _forget()
  sys.path[:0] = [STAND_INS, RELEASED]
  import omegaconf
  from training import wrapper
  yield wrapper, omegaconf
  for path in (STAND_INS, RELEASED):
    sys.path.remove(path)
  _forget()


def _wrapper(tvm, *, do_scale_param=True, cfg=2.0, seed=0, **dit_kwargs):
  """A tiny TVMWrapper built as the training loop builds it (the yaml's network section plus the
  dataset's label_dim / num_classes; the nested model_kwargs a DictConfig whose parent is the
  whole training config), every weight random, in eval mode."""
  wrapper, omegaconf = tvm
  config = omegaconf.OmegaConf.create({
      "network": {"model_type": "DiT_XL_2_18h", "data_type": "bf16", "detach_jvp": False,
                  "do_scale_param": do_scale_param, "compile": True,
                  "model_kwargs": {"do_mod_norm": True, "learn_guidance": True, "qk_norm": True,
                                   "init_type": "spectral", "time_specinit": True}},
      "loss": {"class_name": "training.loss.TVMLoss", "cfg": cfg},
      "optimizer": {"class_name": "torch.optim.AdamW", "lr": 1e-4, "betas": [0.9, 0.95]}})
  torch.manual_seed(seed)
  net = wrapper.TVMWrapper(img_resolution=8, img_channels=4, label_dim=CLASSES, model_type="DiT",
                           data_type="bf16", detach_jvp=False, do_scale_param=do_scale_param,
                           model_kwargs=config["network"]["model_kwargs"], compile=True,
                           num_classes=CLASSES, **{**TINY, **dit_kwargs})
  with torch.no_grad():
    for name, value in net.named_parameters():
      if not name.endswith("pos_embed"):
        value.add_(0.05 * torch.randn_like(value))
  return net.eval()


def _pickle(net, path, marker, *, key="ema", compiled=False):
  """{key: net} as lumalabs/tvm writes it ('net': the training loop's snapshot, its network a
  torch.compile wrapper), the modules' stored source set to PAYLOAD."""
  from torch_utils import persistence
  value = torch.compile(net) if compiled else net
  tree = {key: value}
  if key == "net":
    tree["dataset_kwargs"] = {"class_name": "training.dataset.ImageFolderDataset",
                              "use_labels": True, "xflip": False}
  persistence.STORED_SOURCE.update({name: PAYLOAD.format(marker=str(marker))
                                    for name in ("training.wrapper", "training.dit")})
  try:
    with open(path, "wb") as f:
      pickle.dump(tree, f)
  finally:
    persistence.STORED_SOURCE.clear()
  return str(path)


def _records(value, seen):
  """Every Pickled record reachable from value (dicts, lists, tuples, records' args and state)."""
  if id(value) in seen:
    return
  seen[id(value)] = value
  children = []
  if isinstance(value, pickles.Pickled):
    children = [*value.args, *value.kwargs.values(), value.state, *value.items_, *value.values()]
  elif isinstance(value, dict):
    children = list(value.values())
  elif isinstance(value, (list, tuple)):
    children = list(value)
  for child in children:
    _records(child, seen)


def test_tvm_pickles_load_without_running_their_source(tvm, tmp_path):
  net = _wrapper(tvm)
  marker = tmp_path / "marker"
  path = _pickle(net, tmp_path / "snapshot.pkl", marker, key="net", compiled=True)

  tree = pickles.load(path)
  assert not marker.exists()
  seen = {}
  _records(tree, seen)
  names = {record.qualname for record in seen.values() if isinstance(record, pickles.Pickled)}
  assert {"TVMWrapper", "DiT", "TimestepEmbedder", "LabelEmbedder", "DiTBlock", "FinalLayer",
          "training.dit.Attention", "timm.layers.patch_embed.PatchEmbed", "timm.layers.mlp.Mlp",
          "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig",
          "omegaconf.nodes.AnyNode",
          "torch._dynamo.eval_frame.OptimizedModule"} <= names, names
  persistent = [r for r in seen.values() if isinstance(r, pickles.Pickled) and r.source]
  assert persistent and all("raise RuntimeError" in r.source for r in persistent)
  wrapper = released_tvm.wrapper_of(tree)
  tensors = pickles.module_tensors(wrapper)
  expected = net.state_dict()
  assert sorted(tensors) == sorted(expected) and all(k.startswith("model.") for k in tensors)
  for key, value in expected.items():
    assert np.array_equal(tensors[key], value.numpy()), key
  carried = released_tvm.carried_config(wrapper)
  assert carried["loss"]["cfg"] == 2.0 and carried["optimizer"]["betas"] == [0.9, 0.95]

  with pytest.raises(RuntimeError, match="stored source ran"):   # the control
    with open(path, "rb") as f:
      pickle.load(f)
  assert marker.read_text() == "executed"


def _jax_samples(config, net_params, noise, labels, num_steps):
  config = config.copy_and_resolve_references()
  config.sampling.num_steps = num_steps
  sample = sampling.build(config, objectives.describe(config), state.build_model(config).apply)
  return np.asarray(jax.jit(sample)({"net": net_params}, noise, labels, jax.random.key(0)))


LAYOUTS = {
    # the README's file: {'ema': TVMWrapper}, do_scale_param, cfg 2 at 1 step by its name
    "im256_w2": dict(name="im256_w2.pkl", key="ema", compiled=False, do_scale_param=True,
                     cfg=2.0, expected_cfg=2.0, expected_steps=1),
    # a training snapshot: {'net': torch.compile(TVMWrapper)}, no output scale, its loss.cfg
    "snapshot": dict(name="network-snapshot-500.pkl", key="net", compiled=True,
                     do_scale_param=False, cfg=2.5, expected_cfg=2.5, expected_steps=1),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_imported_tvm_pickle_matches_the_authors_network_sampler_and_export(tvm, tmp_path,
                                                                             layout):
  from kdiff_jax.export import torch_load, torch_sampling
  wrapper_module = tvm[0]
  spec = LAYOUTS[layout]
  net = _wrapper(tvm, do_scale_param=spec["do_scale_param"], cfg=spec["cfg"])
  path = _pickle(net, tmp_path / spec["name"], tmp_path / "marker", key=spec["key"],
                 compiled=spec["compiled"])
  state_dict, config = pretrained.read(path)
  assert not (tmp_path / "marker").exists()
  model, tvm_config = config.model, config.objective.tvm
  assert (model.size, model.num_heads, model.patch_size, model.qk_norm, model.modulation_norm,
          model.init) == ("T", 4, 2, True, True, "spectral_except_embedders")
  assert (config.data.image_size, config.data.channels, config.data.num_classes) == (8, 4, CLASSES)
  assert (tvm_config.scale_output, tvm_config.cfg) == (spec["do_scale_param"], spec["expected_cfg"])
  assert (config.sampling.num_steps, config.sampling.guidance_scale) == (
      spec["expected_steps"], spec["expected_cfg"])
  net_params = checkpoints.import_state_dict(state_dict, config)

  # The network F(x, t, t - s, y, beta) against the authors' DiT (null label included).
  rng = np.random.default_rng(0)
  n = 6
  x = rng.normal(size=(n, 8, 8, 4)).astype(np.float32)
  t, h, beta = (rng.uniform(0.05, 1.0, n).astype(np.float32) for _ in range(3))
  labels = np.array([0, 3, 9, CLASSES, 5, CLASSES])
  one_hot = torch.nn.functional.one_hot(torch.from_numpy(labels), CLASSES + 1)[:, :CLASSES].float()
  got = np.asarray(state.build_model(config).apply(net_params, x, t, labels, h, guidance=beta))
  with torch.no_grad():
    expected = net.model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                         torch.from_numpy(h), one_hot, torch.from_numpy(beta))
  expected = expected.permute(0, 2, 3, 1).numpy()
  assert np.std(expected) > 0.1
  network_error = np.max(np.abs(got - expected))

  # Samples at 1, 2 and 4 steps: the authors' generator_fn and the torch export's sampler.
  config.export.output_dir = str(tmp_path / "export")
  checkpoints.init_workdir(config, str(tmp_path / "run"), net_params)
  paths = checkpoints.export_checkpoint(config, str(tmp_path / "run"))
  exported, meta = torch_load.load(paths["json"])
  noise = rng.normal(size=(n, 8, 8, 4)).astype(np.float32)
  noise_nchw = torch.from_numpy(noise).permute(0, 3, 1, 2)
  errors = {}
  for num_steps in (1, 2, 4):
    ours = _jax_samples(config, net_params, noise, labels, num_steps)
    authors = wrapper_module.generator_fn(net, noise_nchw, one_hot, num_steps, spec["expected_cfg"])
    with torch.no_grad():
      export = torch_sampling.sample(exported, meta, noise_nchw, torch.from_numpy(labels),
                                     num_steps=num_steps)
    authors, export = (v.permute(0, 2, 3, 1).numpy() for v in (authors, export))
    assert np.std(authors - noise) > 0.1
    errors[num_steps] = (np.max(np.abs(ours - authors)), np.max(np.abs(ours - export)))
  print(f"{layout}: |F| <= {np.max(np.abs(expected)):.2f}, network {network_error:.1e}; "
        "samples (vs authors, vs export) by steps:",
        {k: f"{a:.1e}, {b:.1e}" for k, (a, b) in errors.items()})
  assert network_error <= 1e-5
  assert max(max(pair) for pair in errors.values()) <= 1e-5


def test_import_starts_the_teacher_at_the_file_and_checks_an_experiment_config(tvm, tmp_path):
  """The step-0 state: network, EMA and TVM teacher are the file's weights, the optimizer state
  fresh; an experiment --config whose network differs from the file's is refused by field."""
  from kdiff_jax import checkpoint, train_state
  path = _pickle(_wrapper(tvm), tmp_path / "im256_w2.pkl", tmp_path / "marker")
  state_dict, config = pretrained.read(path)
  net_params = checkpoints.import_state_dict(state_dict, config)
  checkpoints.init_workdir(config, str(tmp_path / "run"), net_params)
  setup = train_state.setup(config)
  mngr = checkpoint.manager(str(tmp_path / "run"), config.checkpoint)
  restored, _ = checkpoint.restore(mngr, setup.abstract_state)
  mngr.close()
  for weights in (restored["params"], restored["teacher"], *restored["ema"].values()):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(weights["net"]), net_params)
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(restored["opt_state"])
             if np.asarray(leaf).dtype == np.float32)

  experiment = config.copy_and_resolve_references()
  experiment.model.qk_norm, experiment.objective.tvm.scale_output = False, False
  with pytest.raises(ValueError, match=r"model.qk_norm=False \(the file: True\); "
                                       r"objective.tvm.scale_output=False \(the file: True\)"):
    released_tvm.check_config(config, experiment)
  same = config.copy_and_resolve_references()
  same.model.num_heads, same.model.size = 0, "T"   # 0: the size's own heads (2), not the file's
  with pytest.raises(ValueError, match=r"model.num_heads=2 \(the file: 4\)"):
    released_tvm.check_config(config, same)


@pytest.mark.parametrize("change, name, message", [
    (dict(depth=3), "im256_w2.pkl",
     r"a DiT of depth 3 and width 64; expected one of kdiff_jax's DiT sizes"),
    (dict(temb_mult=2), "im256_w2.pkl",
     r"t_embedder.mlp.0.weight is \(128, 256\); expected \(64, 256\)"),
    (dict(learn_guidance=False), "im256_w2.pkl",
     r"the TVMWrapper's DiT has no guidance_embedder; expected lumalabs/tvm's DiT with "
     "learn_guidance"),
    (dict(do_scale_param=True), "im512_w2p5.pkl",
     r"do_scale_param=True in a file named im512_w2p5; expected do_scale_param=False"),
    (dict(), "mine.pkl",
     r"a TVM pickle named 'mine' without a training config \(loss.cfg\) in it; expected one of "
     r"lumalabs/tvm's files"),
], ids=["unknown_size", "wide_conditioning", "no_guidance_embedder", "name_disagrees",
        "no_cfg"])
def test_a_tvm_file_of_another_layout_or_size_is_refused_in_one_line(tvm, tmp_path, change, name,
                                                                      message):
  wrapper_kwargs = {k: change.pop(k) for k in ("do_scale_param",) if k in change}
  net = _wrapper(tvm, **wrapper_kwargs, **change)
  if name == "mine.pkl":   # no training config rides along
    net.model_kwargs = {}
  path = _pickle(net, tmp_path / name, tmp_path / "marker")
  with pytest.raises(ValueError, match=message) as error:
    pretrained.read(path)
  assert "\n" not in str(error.value) and str(error.value).startswith(f"--import_from={path}: ")


def test_main_imports_a_tvm_pickle_and_samples_it_with_no_other_flag(tvm, tmp_path):
  marker = tmp_path / "marker"
  path = _pickle(_wrapper(tvm), tmp_path / "im256_w2.pkl", marker)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  workdir = tmp_path / "run"
  output = ""
  for mode in (["--mode=import", f"--import_from={path}"], ["--mode=sample"]):
    result = subprocess.run([sys.executable, "main.py", f"--workdir={workdir}", *mode], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    output += result.stdout + result.stderr
    assert result.returncode == 0, result.stderr[-2000:]
  print(output)
  assert not marker.exists()
  assert ("TVM dit T/2 (4 heads) on 8x8x4, 10 classes, velocity cfg·F; sampling tvm 1 step(s), "
          "cfg 2.0") in output
  with np.load(workdir / "samples_step0_tvm_1steps_w2.npz") as archive:
    images = archive[archive.files[0]]
  assert images.shape[1:] == (8, 8, 4) and np.all(np.isfinite(images))

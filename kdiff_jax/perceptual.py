"""The frozen perceptual feature networks of pixel MeanFlow's auxiliary losses (pMF, arXiv
2601.22158; the official code's utils/auxloss_util.py): LPIPS with VGG16 (models/lpips.py) and
the ConvNeXt V2 classifier (models/convnext.py), loaded from weight files the user has.

  frozen = perceptual.load(config)     # host arrays of the nets whose weight > 0
  shapes = perceptual.abstract(config) # their ShapeDtypeStructs, nothing read or drawn
  d = perceptual.distances(frozen, config, key, x_hat, x)   # {'lpips': [B], 'convnext': [B]}
  objective = dict(loss=..., frozen=perceptual.loader(config))   # an objective's build()

`distances` takes ONE random resized crop per example, the same box for x̂ and x, resampled to
perceptual.crop_size (`paired_random_resized_crop`), then per example the LPIPS distance and
‖c(x̂) − c(x)‖², c the ConvNeXt's output (its pooled, layer-normed features as the official code
takes them, or its logits). A net whose weight is 0 is neither loaded nor run; its distance is 0.
Images enter NHWC in [−1, 1].

The weights (`weights(config)`) are the objective's own: objective.<name>.lpips_weight and
convnext_weight (pMF's λ); an objective without them uses none. The config check (`check`) stops
a run at start when a file of a net in use is missing, naming the field and where to get it;
perceptual.random_weights draws random weights instead of reading files: 'tiny' nets (CPU demos
and tests) or 'full', the recipe's architectures at full size (VGG16, ConvNeXt-V2-base-22k-224:
ahead-of-time compiles and timings without the files).

The train state holds none of this: the trainer takes their shapes (`abstract`) to build the
step, loads the frozen weights once at its first call (a resumed run reloads them from the
files; an ahead-of-time compile never does), places them on the mesh and hands them to the loss
as `frozen=` (kdiff_jax/train_state.py).
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from kdiff_jax.export import convert, state_dicts
from kdiff_jax.models import convnext as convnext_lib, lpips as lpips_lib
from kdiff_jax.rules import interval, number, one_of, text

NETS = ("lpips", "convnext")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CONVNEXT_OUTPUTS = ("pooled", "logits")

# Where each file comes from, for the message of a missing one.
SOURCES = {
    "lpips_vgg16": "torchvision's ImageNet VGG16 state_dict, vgg16-397923af.pth "
                   "(https://download.pytorch.org/models/vgg16-397923af.pth, what "
                   "torchvision.models.vgg16(weights='IMAGENET1K_V1') downloads)",
    "lpips_heads": "the LPIPS linear heads the lpips package ships: lpips/weights/v0.1/vgg.pth "
                   "inside `pip install lpips==0.1.4`",
    "convnext": "a transformers save_pretrained folder (config.json + model.safetensors) of "
                "facebook/convnextv2-base-22k-224 from huggingface, or its model.safetensors "
                "with config.json beside it",
}
# The nets each weight file belongs to.
FILES = {"lpips": ("lpips_vgg16", "lpips_heads"), "convnext": ("convnext",)}

# perceptual.random_weights: 'none' reads the files; 'tiny', the same networks, tiny (CPU demos and
# tests); 'full', the recipe's at full size: VGG16 as LPIPS uses it and the config.json of
# facebook/convnextv2-base-22k-224 (hidden sizes, depths and eps as transformers' ConvNeXt V2
# conversion writes them for 'base'; 1000 ImageNet-1k labels: the 22k models are fine-tuned on 1k).
RANDOM_WEIGHTS = ("none", "tiny", "full")
TINY_LPIPS_WIDTHS = ((4, 4), (8, 8), (8, 8, 8), (8, 8, 8), (8, 8, 8))
TINY_CONVNEXT = dict(hidden_sizes=(8, 8, 8, 8), depths=(1, 1, 1, 1), num_labels=10,
                     layer_norm_eps=1e-12, patch_size=4, num_channels=3)
BASE_CONVNEXT = dict(hidden_sizes=(128, 256, 512, 1024), depths=(3, 3, 27, 3), num_labels=1000,
                     layer_norm_eps=1e-12, patch_size=4, num_channels=3)

RULES = {
    "perceptual.lpips_vgg16": text(),
    "perceptual.lpips_heads": text(),
    "perceptual.convnext": text(),
    "perceptual.convnext_output": one_of(*CONVNEXT_OUTPUTS),
    "perceptual.crop_size": number(32, integer=True, note="ConvNeXt downsamples 32x"),
    "perceptual.crop_scale": interval(number(0, 1, low_open=True)),
    "perceptual.crop_ratio": interval(number(0, low_open=True)),
    "perceptual.compute_dtype": one_of("model", *COMPUTE_DTYPES),
    "perceptual.random_weights": one_of(*RANDOM_WEIGHTS),
}


def weights(config) -> dict:
  """{net: its loss weight} from the objective's section (objective.<name>.lpips_weight,
  convnext_weight; 0 where the section has no such field)."""
  section = getattr(config.objective, config.objective.name, None)
  return {net: float(getattr(section, f"{net}_weight", 0.0)) if section is not None else 0.0
          for net in NETS}


def active(config) -> tuple:
  """The nets with a weight > 0: the ones loaded and run."""
  return tuple(net for net, weight in weights(config).items() if weight > 0)


def compute_dtype(config):
  chosen = config.perceptual.compute_dtype
  return COMPUTE_DTYPES[config.model.compute_dtype if chosen == "model" else chosen]


def _convnext_files(path: str):
  """(config.json, weights) of a save_pretrained folder (its model.safetensors, or an older
  save's pytorch_model.bin), or of a .safetensors file with config.json beside it."""
  if path.endswith(".safetensors"):
    return os.path.join(os.path.dirname(path), "config.json"), path
  weights_file = os.path.join(path, "model.safetensors")
  older = os.path.join(path, "pytorch_model.bin")
  if not os.path.isfile(weights_file) and os.path.isfile(older):
    weights_file = older
  return os.path.join(path, "config.json"), weights_file


def check(config) -> None:
  """Each file of a net in use exists (unless perceptual.random_weights); a missing one is named
  with where to get it."""
  cfg = config.perceptual
  if cfg.random_weights != "none":
    return
  for net in active(config):
    for field in FILES[net]:
      path = cfg[field]
      needed = _convnext_files(path) if field == "convnext" and path else (path,)
      missing = [p for p in needed if not p or not os.path.isfile(p)]
      if missing:
        name = config.objective.name
        found = "not set" if not path else f"{missing[0]!r} does not exist"
        raise ValueError(
            f"perceptual.{field}={path!r}: {found}; "
            f"objective.{name}.{net}_weight={weights(config)[net]} needs {SOURCES[field]}. "
            "Nothing is downloaded; or set the weight to 0, or perceptual.random_weights=tiny "
            "(tiny random nets) or full (the full-size nets, random)")


@functools.lru_cache(maxsize=4)
def _read_json(path: str) -> dict:
  with open(path) as file:
    return json.load(file)


def convnext_architecture(config) -> dict:
  """The ConvNeXt's sizes: from its config.json (transformers' field names), or the random
  weights' (tiny or base)."""
  random_weights = config.perceptual.random_weights
  if random_weights != "none":
    return dict(TINY_CONVNEXT if random_weights == "tiny" else BASE_CONVNEXT)
  saved = _read_json(_convnext_files(config.perceptual.convnext)[0])
  return dict(hidden_sizes=tuple(saved["hidden_sizes"]), depths=tuple(saved["depths"]),
              num_labels=len(saved.get("id2label", {})) or saved.get("num_labels", 1000),
              layer_norm_eps=saved.get("layer_norm_eps", 1e-12),
              patch_size=saved.get("patch_size", 4), num_channels=saved.get("num_channels", 3))


def _build(config, net, dtype, seed=0):
  """The module of `net` with random weights (abstract under nnx.eval_shape)."""
  rngs = nnx.Rngs(seed)
  if net == "lpips":
    tiny = config.perceptual.random_weights == "tiny"
    widths = TINY_LPIPS_WIDTHS if tiny else lpips_lib.VGG16_WIDTHS
    return lpips_lib.LPIPS(widths, dtype=dtype, rngs=rngs)
  return convnext_lib.ConvNextV2ForImageClassification(**convnext_architecture(config),
                                                       dtype=dtype, rngs=rngs)


def _graphdef(config, net):
  return nnx.split(nnx.eval_shape(lambda: _build(config, net, compute_dtype(config))))[0]


def _read(config, net) -> dict:
  """The float32 pure-dict params of `net` from its files (their layouts: docs/perceptual.md):
  torchvision's features.N.* (its classifier.* unread), the heads' lin{l}.model.1.weight as
  lin{l}.weight, transformers' names as they are with GRN's [1, 1, 1, C] flattened."""
  cfg = config.perceptual
  build = lambda: _build(config, net, jnp.float32)
  if net == "lpips":
    state = state_dicts.read_state_dict(cfg.lpips_vgg16)
    state = {key: value for key, value in state.items() if key.startswith("features.")}
    state.update({key.replace(".model.1.", "."): value for key, value in
                  state_dicts.read_state_dict(cfg.lpips_heads).items()})
    return convert.load(build, state)[1]
  state = state_dicts.read_state_dict(_convnext_files(cfg.convnext)[1])
  state = {key: value.reshape(-1) if ".grn." in key else value for key, value in state.items()}
  return convert.load(build, state)[1]


def _random(config, net) -> dict:
  """Random params (seed 0: a resumed run gets the same); LPIPS heads made non-negative as the
  trained ones are, so the distance stays a distance."""
  params = nnx.to_pure_dict(nnx.state(_build(config, net, jnp.float32), nnx.Param))
  params = jax.tree.map(np.asarray, params)
  if net == "lpips":
    for tap in range(len(lpips_lib.VGG16_WIDTHS)):
      params[f"lin{tap}"]["kernel"] = np.abs(params[f"lin{tap}"]["kernel"])
  return params


def _host_dtype(config):
  return ml_dtypes.bfloat16 if compute_dtype(config) == jnp.bfloat16 else np.float32


def load(config) -> dict:
  """{net: its frozen params (NumPy, in the compute dtype)} of the nets in use (`active`)."""
  check(config)
  read = _random if config.perceptual.random_weights != "none" else _read
  return {net: jax.tree.map(lambda x: np.asarray(x, _host_dtype(config)), read(config, net))
          for net in active(config)}


def abstract(config) -> dict:
  """{net: ShapeDtypeStructs of what `load` returns}, from the architectures alone
  (nnx.eval_shape: no file read but ConvNeXt's config.json, no weight drawn)."""
  check(config)
  def shapes(net):
    module = nnx.eval_shape(lambda: _build(config, net, jnp.float32))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, _host_dtype(config)),
                        nnx.to_pure_dict(nnx.state(module, nnx.Param)))
  return {net: shapes(net) for net in active(config)}


class Loader:
  """An objective's `frozen` (objectives.Objective.frozen): calling it loads (`load`), `shapes()`
  says what it loads without loading (`abstract`), so a setup or an ahead-of-time compile holds
  no weights until the first step."""

  def __init__(self, config):
    self.config = config

  def __call__(self) -> dict:
    return load(self.config)

  def shapes(self) -> dict:
    return abstract(self.config)


def crop_boxes(key, batch: int, height: int, width: int, scale=(0.08, 1.0),
               ratio=(3 / 4, 4 / 3)):
  """(top, left, crop_h, crop_w), each [batch] int32: one random resized crop box per example.

  As the official paired_random_resized_crop draws them: area fraction a ~ U[scale], aspect
  ρ = exp(U[log ratio]); width = clip(round(√(a·H·W·ρ)), 1, W), height = clip(round(√(a·H·W/ρ)),
  1, H) (no retries); top ~ U{0..H − height}, left ~ U{0..W − width}."""
  def box(key):
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    area = height * width * jax.random.uniform(k_area, (), minval=scale[0], maxval=scale[1])
    log_ratio = jnp.log(jnp.asarray(ratio, jnp.float32))
    aspect = jnp.exp(jax.random.uniform(k_ratio, (), minval=log_ratio[0], maxval=log_ratio[1]))
    crop_w = jnp.clip(jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32), 1, width)
    crop_h = jnp.clip(jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32), 1, height)
    top = jax.random.randint(k_top, (), 0, height - crop_h + 1)
    left = jax.random.randint(k_left, (), 0, width - crop_w + 1)
    return top, left, crop_h, crop_w

  return jax.vmap(box)(jax.random.split(key, batch))


def resized_crop(image, top, left, crop_h, crop_w, size: int):
  """The box [top, top + crop_h) x [left, left + crop_w) of one [H, W, C] image resampled to
  [size, size, C] by jax.image.scale_and_translate, Keys cubic (a = −0.5) with antialiasing, on
  the whole image (the kernel reads the pixels just outside the box, as PIL's resize with a box
  does), as the official code resamples."""
  factor = jnp.stack([size / crop_h, size / crop_w]).astype(jnp.float32)
  shift = -jnp.stack([top, left]).astype(jnp.float32) * factor
  return jax.image.scale_and_translate(image.astype(jnp.float32), (size, size, image.shape[-1]),
                                       (0, 1), factor, shift, method="cubic", antialias=True)


def loader(config):
  """An objective's `frozen` loader (`Loader`), or None when no net is in use (nothing to load,
  nothing handed to the loss)."""
  return Loader(config) if active(config) else None


def paired_random_resized_crop(key, x_hat, x, size: int, scale=(0.08, 1.0),
                               ratio=(3 / 4, 4 / 3)):
  """(x̂ crops, x crops), [B, size, size, C]: per example one box (`crop_boxes`), the same for
  both images, resampled by `resized_crop`."""
  boxes = crop_boxes(key, *x.shape[:3], scale, ratio)
  crop = jax.vmap(functools.partial(resized_crop, size=size))
  return crop(x_hat, *boxes), crop(x, *boxes)


def distances(frozen: dict, config, key, x_hat, x) -> dict:
  """{'lpips': [B], 'convnext': [B]} on one paired random resized crop (module docstring);
  zeros for a net not in `frozen`."""
  cfg = config.perceptual
  x_hat, x = paired_random_resized_crop(key, x_hat, x, cfg.crop_size, cfg.crop_scale,
                                        cfg.crop_ratio)
  out = {net: jnp.zeros((x.shape[0],), jnp.float32) for net in NETS}
  if "lpips" in frozen:
    out["lpips"] = nnx.merge(_graphdef(config, "lpips"), frozen["lpips"])(x_hat, x)
  if "convnext" in frozen:
    net = nnx.merge(_graphdef(config, "convnext"), frozen["convnext"])
    features_hat, features = lpips_lib.unpaired(
        (net.pooled if cfg.convnext_output == "pooled" else net)(lpips_lib.paired(x_hat, x)))
    out["convnext"] = jnp.sum(jnp.square(features_hat - features), -1)
  return out

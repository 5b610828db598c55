"""The config schema: every field a run reads, with its default.

`defaults()` is the base config, in sections (data, model, objective, perceptual, optimizer,
training, sampling, mesh, eval, checkpoint, export); `configs/` experiments start from it and
override a few fields. A field that is not here does not exist: `config.validate` rejects it,
naming the known fields. Each objective's own section (objective.imm, objective.tvm, ...) comes
from its module through the registry (`objectives.sections`), so a registered objective brings
its fields. Each registry (data, models, objectives, perceptual, sampling, parallel) states the
rules of its own section with the vocabulary of kdiff_jax/rules.py (named here too, for the
registries that read it from here); `config.validate` applies them all before anything is built
or compiled.
"""
import difflib

import ml_collections

from kdiff_jax import objectives
from kdiff_jax.rules import (Rule, boolean, interval, number, one_of,  # noqa: F401 (vocabulary)
                             sequence, text)


def defaults() -> ml_collections.ConfigDict:
  """The base configuration: every choice a run makes, with its default."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # --- data: where batches come from. Images are NHWC float32 in [-1, 1] (or scaled latents).
  config.data = data = ml_collections.ConfigDict()
  data.name = "digits"            # digits | synthetic | subspace | tfds | latents | toy2d
  data.image_size = 8             # height = width of the training arrays
  data.channels = 1
  data.num_classes = 10           # the null (CFG) label is num_classes; 0: unconditional (no label
                                  # embedding, labels unused, no guidance)
  data.random_flip = False        # horizontal flips (never for digits)
  data.tfds_name = ""             # e.g. "imagenet2012", "cifar10"
  data.tfds_split = "train"
  data.tfds_data_dir = ""         # "" = TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)
  data.latents_path = ""          # directory with latents.npy (or mean.npy + std.npy) and labels.npy
  data.latent_channel_mean = ()   # per-channel normalisation of latents: (z - mean) / std * scale
  data.latent_channel_std = ()
  data.latent_scale = 1.0
  data.toy_name = "8gaussians"    # 8gaussians | moons | checkerboard (data.name = toy2d)
  data.intrinsic_dim = 8          # data.name = subspace: d of the d-dim subspace of the images
  data.shuffle_buffer = 10_000    # tfds only
  data.vae_path = ""              # SD-VAE weights (diffusers dir or .safetensors): encode_latents, decoding latent samples
  data.latent_shard_size = 10_000  # main.py --mode=encode_latents: examples per shard
  data.encode_batch_size = 64     # main.py --mode=encode_latents: images per VAE call on each process

  # --- model: the denoiser network.
  config.model = model = ml_collections.ConfigDict()
  model.name = "dit"              # dit | imf_dit (objective imf) | pmf_dit (pixel MeanFlow) | jit (pixels) | unet (DDPM++, pixels) | mlp (flat inputs [B, data.channels], 2-D toys)
  model.size = "S"                # dit: T | XS | S | B | L | XL (T, XS: tiny CPU sizes); jit: T | XS | B | L | H; unet: T | ddpmpp; imf_dit: T | XS | B | M | L | XL; pmf_dit: T | XS | B | L | H
  model.patch_size = 2            # dit: 1 | 2 | 4 | 8; jit, pmf_dit: also 16 | 32; unet: 1 (no patches)
  model.mlp_ratio = 4.0
  model.second_time_embedder = False  # a second time input (IMM's s or t - s)
  model.time_scale = 1000.0       # the time embedder sees time_scale * t
  model.compute_dtype = "float32"  # float32 | bfloat16 (params stay float32)
  model.remat = "none"            # none | full | dots
  model.scan_blocks = False       # one lax.scan over stacked blocks: compile time independent of depth
  model.attention = "xla"         # dit, jit: xla (plain softmax; the only one jax.jvp goes through) | cudnn (GPU flash, bfloat16)
  model.mlp_width = 256           # model.name = mlp: hidden width
  model.mlp_depth = 3             # model.name = mlp: residual blocks
  model.dropout = 0.0             # unet: dropout in every residual block, training passes only
  model.class_conditional = True  # kept for old checkpoints' configs (False: their U-Net ignores
                                  # labels); new configs say unconditional with data.num_classes = 0
  # dit: TVM's options (models/dit.py), DiT's own by default
  model.num_heads = 0             # attention heads; 0 = the size's (TVM's XL/2: 18)
  model.norm = "layer_norm"       # layer_norm | rms_norm (both without affine)
  model.qk_norm = False           # per-head RMSNorm of q and k
  model.modulation_norm = False   # each adaLN chunk divided by its RMS (TVM's do_mod_norm)
  model.guidance_embedder = False  # a learned embedding of the guidance input beta = 1/cfg (TVM)
  model.init = "xavier_uniform"   # xavier_uniform (DiT) | spectral (TVM: normal / largest singular value) | spectral_except_embedders (TVM's time_specinit false)
  # pmf_dit: what its heads predict, turned into u = (z - x_hat)/clip(t, t_floor, 1) by the network
  model.prediction = "x"          # x (pMF) | eps | velocity | u_k (k-Diff's k, from objective.kdiff.k_init / w_k_scale)
  model.t_floor = 0.05            # the clip of t in the network's conversions (pMF's 0.05)

  # --- objective: what the network is trained to predict, and the loss.
  config.objective = objective = ml_collections.ConfigDict()
  objective.name = "flow"         # flow | imm | kdiff | meanflow | imf | pmf | tvm, or a registered one
  objective.schedule = "rectified_flow"  # rectified_flow | cosine | vp
  objective.prediction = "velocity"  # eps | x | v | velocity | score
  objective.loss_target = "velocity"  # the space the L2 loss is taken in: eps | x | v | velocity
  objective.time_sampling = "uniform"  # uniform | logit_normal
  objective.logit_normal_mean = 0.0  # in our convention (t = 0 data); see docs/parameterization.md
  objective.logit_normal_std = 1.0
  objective.t_min = 0.0           # times are drawn in [t_min, t_max]
  objective.t_max = 1.0
  objective.noise_std = 1.0       # n ~ N(0, noise_std^2 I)
  objective.label_dropout = 0.1   # probability of the null label (classifier-free guidance)
  objective.min_divisor = 0.0     # clamp of divisions by sigma / alpha / Delta near the ends (JiT: 0.05)
  # Each objective's own section, objective.<name> (its defaults and rules live in its module,
  # kdiff_jax/objectives/<name>.py, gathered by the registry).
  for name, section in objectives.sections().items():
    objective[name] = section

  # --- perceptual: the frozen feature nets of an objective's perceptual losses (pMF's LPIPS and
  # ConvNeXt; kdiff_jax/perceptual.py, docs/perceptual.md), run where objective.<name>.lpips_weight
  # or convnext_weight > 0. Nothing is downloaded: the files are the user's.
  config.perceptual = perceptual = ml_collections.ConfigDict()
  perceptual.lpips_vgg16 = ""     # torchvision's VGG16 state_dict (vgg16-397923af.pth)
  perceptual.lpips_heads = ""     # the lpips package's lpips/weights/v0.1/vgg.pth
  perceptual.convnext = ""        # save_pretrained folder (or .safetensors), convnextv2-base-22k-224
  perceptual.convnext_output = "pooled"  # pooled (normed pooled features: pMF's code) | logits
  perceptual.crop_size = 224      # one paired random resized crop per example, to crop_size^2
  perceptual.crop_scale = (0.08, 1.0)  # its area fraction
  perceptual.crop_ratio = (3 / 4, 4 / 3)  # its aspect ratio
  perceptual.compute_dtype = "model"  # model (= model.compute_dtype) | float32 | bfloat16
  perceptual.random_weights = "none"  # none (the files) | tiny (CPU demos) | full (compiles, timings)

  # --- optimizer: optax AdamW or Muon with linear warm-up, then constant or cosine.
  config.optimizer = optimizer = ml_collections.ConfigDict()
  optimizer.name = "adamw"        # adamw | muon (2-D weights by Muon, the rest by Adam: b1, b2, eps)
  optimizer.learning_rate = 1e-4
  optimizer.lr_schedule = "constant"  # constant | cosine
  optimizer.warmup_steps = 0
  optimizer.b1 = 0.9
  optimizer.b2 = 0.999
  optimizer.eps = 1e-8
  optimizer.weight_decay = 0.0    # adamw: decays arrays with ndim >= 2 only (no biases, norms, scalars)
  optimizer.grad_clip_norm = 0.0  # 0 = no clipping

  # --- training: the loop.
  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 256       # global batch, over all hosts and devices
  training.num_steps = 1000
  training.ema_decays = (0.9999,)  # one EMA pytree per constant decay
  training.ema_halflives_kimg = ()  # one EMA pytree per half-life (thousands of images), EDM's
                                    # ramp-up: beta = 0.5^(batch / min(H*1000, images*0.05))
  training.log_every = 50         # metrics are averaged over log_every steps ...
  training.per_step_metrics = ()  # ... except these, written at every step (e.g. ("k",) for k-Diff)
  training.sample_every = 0       # steps between sample-grid PNGs; 0 = only at the end
  training.checkpoint_every = 500
  # A non-finite loss or gradient (or, with spike_factor > 0, a loss above spike_factor times the
  # mean of the last 100): stop (naming the step and what went non-finite) | rollback_skip:
  # restore the newest checkpoint, skip every batch since it, go on (PaLM's recipe); at most
  # max_rollbacks times in a run.
  training.on_nonfinite = "stop"
  training.max_rollbacks = 3
  training.spike_factor = 0.0     # 0 = off

  # --- sampling: sample grids during training, main.py --mode=sample / eval / export.
  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.method = "heun"        # flow, kdiff: see kdiff_jax.samplers; imm: pushforward | restart
  sampling.num_steps = 32
  sampling.grid = "uniform_t"     # uniform_t | karras | uniform_lambda | shift | cifar (IMM's 1-2 steps)
                                  # | leading | leading_multistep | linspace | trailing (diffusers', VP)
  sampling.t_start = 1.0          # sampling runs from t_start (noise) down to t_end
  sampling.t_end = 0.0
  # The method's and grid's options (kdiff_jax.samplers); changing one the method and grid do not
  # read is an error.
  sampling.options = ml_collections.ConfigDict(dict(
      eta=0.0,                    # ddim: 0 deterministic, 1 the ancestral DDPM posterior step
      S_churn=0.0,                # edm_heun: Karras et al. 2022 Alg. 2 churn (0 = deterministic),
      S_tmin=0.0,                 #   applied where S_tmin <= sigma/alpha <= S_tmax,
      S_tmax=float("inf"),
      S_noise=1.0,                #   with noise scale S_noise
      midpoint="t",               # f_pndm: the RK midpoint halves t | eta
      variant="bh2",              # unipc_2: B(h) = h (bh1) | expm1(h) (bh2)
      lower_order_final=False,    # dpm_solver_2m, unipc_2: the last step first order (diffusers'; see samplers/grids.py)
      rho=7.0,                    # grid karras: the ramp's exponent
      shift=3.0,                  # grid shift: t' = a·t/(1 + (a-1)·t)
      steps_offset=0,             # grids leading, leading_multistep: diffusers' steps_offset
  ))
  sampling.guidance_scale = 1.0   # 1 = no guidance
  sampling.guidance_interval = (0.0, 1.0)  # guidance only for t in this interval
  sampling.grid_size = 8          # the PNG holds grid_size x grid_size samples
  sampling.use_ema = True
  sampling.ema_halflife_kimg = 0.0  # the EMA of this half-life; 0 = the first of
                                    # training.ema_halflives_kimg, else of training.ema_decays
  sampling.num_samples = 64       # main.py --mode=sample
  sampling.classes = ()           # main.py --mode=sample: classes to cycle through; () = all
  sampling.seed = 0

  # --- mesh: device mesh and logical-axis rules. -1 = all remaining devices.
  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1
  mesh.fsdp = 1
  mesh.tensor = 1
  mesh.dcn_data = 1               # TPU slices the data axis spans (over DCN); 1 = one slice
  mesh.replicated_limit = 1_000_000  # a parameter larger than this that fsdp > 1 cannot shard is an error
  mesh.gather_weights = "once"    # once: the step all-gathers each weight once and holds it | per_call
  mesh.rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("classes", None),
  )

  # --- eval: FID / IS / precision-recall (kdiff_jax/evaluate.py): in-loop FID-n and --mode=eval.
  config.eval = eval_ = ml_collections.ConfigDict()
  eval_.fid_every = 0             # steps between in-loop FID-n; 0 = never
  eval_.fid_num_samples = 10_000  # n of the in-loop FID-n
  eval_.num_samples = 50_000      # main.py --mode=eval
  eval_.batch_size = 256          # global batch of sampling and Inception
  eval_.inception_path = ""       # pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or its .npz)
  eval_.reference_path = ""       # ADM reference .npz (mu, sigma, arr_0); "" = the training data
  eval_.reference_num_examples = 50_000  # reference_path = "": images of the data stream used

  # --- checkpoint: Orbax.
  config.checkpoint = checkpoint = ml_collections.ConfigDict()
  checkpoint.max_to_keep = 3
  checkpoint.async_save = True

  # --- export: main.py --mode=export (kdiff_jax/export): .safetensors, .pt and .json for PyTorch.
  config.export = export = ml_collections.ConfigDict()
  export.use_ema = True           # the EMA sampling.ema_halflife_kimg chooses; False: the raw weights
  export.output_dir = ""          # "" = <workdir>/export

  return config


def flatten(config, prefix: str = "") -> dict:
  """{'section.field': value} for every leaf of a (nested) ConfigDict or dict."""
  out = {}
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(flatten(value, path + "."))
    else:
      out[path] = value
  return out


def from_dict(saved: dict) -> ml_collections.ConfigDict:
  """A config saved as JSON (a checkpoint's) over `defaults()`: lists become tuples again,
  fields added to the schema since keep their defaults, and an objective's older spelling is
  brought up to date (`objectives.upgrade`, e.g. iMF saved as MeanFlow's variant)."""
  def tuples(value):
    if isinstance(value, dict):
      return {key: tuples(v) for key, v in value.items()}
    if isinstance(value, list):
      return tuple(tuples(v) for v in value)
    return value

  config = defaults()
  config.update(tuples(objectives.upgrade(saved)))
  return config


def check_field_names(paths) -> None:
  """Each of `paths` ('section.field') is a field of the schema; an unknown one is named with
  the known fields of its section and the closest match."""
  known = flatten(defaults())
  sections = {p.rpartition(".")[0] for p in known if "." in p}
  for path in paths:
    if path in known:
      continue
    section, _, name = path.rpartition(".")
    siblings = sorted(p for p in known if p.rpartition(".")[0] == section)
    if section in sections:   # a known section: the closest field name in it
      close = difflib.get_close_matches(name, [p.rpartition(".")[2] for p in siblings], n=1)
      guess = f"{section}.{close[0]}" if close else ""
    else:                     # an unknown section: the closest section with this field
      close = difflib.get_close_matches(section, sorted(sections), n=1)
      guess = f"{close[0]}.{name}" if close and f"{close[0]}.{name}" in known else ""
    hint = f"; did you mean {guess!r}?" if guess else ""
    listed = (f"known fields of {section!r}: {siblings}" if siblings else
              f"known sections: {sorted(p for p in sections if '.' not in p)}")
    raise ValueError(f"unknown config field {path!r}{hint} ({listed})")

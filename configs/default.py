"""Base configuration: every choice a run makes, in sections.

Experiments import this, override a few fields, and return the result. `kdiff_jax.config`
validates the final config against this schema (unknown fields and invalid values fail at
start, naming the field and the allowed values).
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0

  # --- data: where batches come from. Images are NHWC float32 in [-1, 1] (or scaled latents).
  config.data = data = ml_collections.ConfigDict()
  data.name = "digits"            # digits | synthetic | tfds | latents | toy2d
  data.image_size = 8             # height = width of the training arrays
  data.channels = 1
  data.num_classes = 10           # the null (CFG) label is num_classes
  data.random_flip = False        # horizontal flips (never for digits)
  data.tfds_name = ""             # e.g. "imagenet2012", "cifar10"
  data.tfds_split = "train"
  data.tfds_data_dir = ""         # "" = TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)
  data.latents_path = ""          # directory with latents.npy (or mean.npy + std.npy) and labels.npy
  data.latent_channel_mean = ()   # per-channel normalisation of latents: (z - mean) / std * scale
  data.latent_channel_std = ()
  data.latent_scale = 1.0
  data.toy_name = "8gaussians"    # 8gaussians | moons | checkerboard (data.name = toy2d)
  data.shuffle_buffer = 10_000    # tfds only
  data.vae_path = ""              # SD-VAE weights (diffusers dir or .safetensors): encode_latents, decoding latent samples
  data.latent_shard_size = 10_000  # main.py --mode=encode_latents: examples per shard
  data.encode_batch_size = 64     # main.py --mode=encode_latents: images per VAE call on each process

  # --- model: the denoiser network.
  config.model = model = ml_collections.ConfigDict()
  model.name = "dit"              # dit | jit (pixels) | mlp (flat inputs [B, data.channels], 2-D toys)
  model.size = "S"                # T | XS | S | B | L | XL (T, XS: tiny CPU sizes); jit: T | XS | B | L | H
  model.patch_size = 2            # 1 | 2 | 4 | 8 (| 16 | 32 for jit)
  model.mlp_ratio = 4.0
  model.second_time_embedder = False  # a second time input (IMM's s or t - s)
  model.time_scale = 1000.0       # the time embedder sees time_scale * t
  model.compute_dtype = "float32"  # float32 | bfloat16 (params stay float32)
  model.remat = "none"            # none | full | dots
  model.mlp_width = 256           # model.name = mlp: hidden width
  model.mlp_depth = 3             # model.name = mlp: residual blocks

  # --- objective: what the network is trained to predict, and the loss.
  config.objective = objective = ml_collections.ConfigDict()
  objective.name = "flow"         # flow | imm | kdiff
  objective.schedule = "rectified_flow"  # rectified_flow | cosine | vp
  objective.prediction = "velocity"  # eps | x | v | velocity | score
  objective.loss_target = "velocity"  # the space the L2 loss is taken in: eps | x | v | velocity
  objective.time_sampling = "uniform"  # uniform | logit_normal
  objective.logit_normal_mean = 0.0  # in our convention (t = 0 data); see specs/parameterization.md
  objective.logit_normal_std = 1.0
  objective.t_min = 0.0           # times are drawn in [t_min, t_max]
  objective.t_max = 1.0
  objective.noise_std = 1.0       # n ~ N(0, noise_std^2 I)
  objective.label_dropout = 0.1   # probability of the null label (classifier-free guidance)
  objective.min_divisor = 0.0     # clamp of divisions by sigma / alpha / Delta near the ends (JiT: 0.05)
  # objective.name = imm (specs/imm.md): sigma_d = noise_std (0.5), [eps, T] = [t_min, t_max];
  # needs model.second_time_embedder = True.
  objective.imm = imm = ml_collections.ConfigDict()
  imm.group_size = 4              # M particles per group, one (s, r, t) per group
  imm.k = 12                      # r(s,t): eta decrement (eta(T) - eta(eps))/2^k (ImageNet 12, CIFAR 15)
  imm.delta = 0.0                 # minimum gap t - r (1e-4 when training in low precision)
  imm.f_type = "euler_fm"         # euler_fm | simple_edm | identity: the one-step map f_{s,t}
  imm.kernel = "laplace"          # laplace | rbf
  imm.bandwidth = 1.0             # c, the kernel scale multiple (1: the paper): laplace exp(-d/(c |c_out| D)),
                                  # rbf exp(-d^2/(2 h^2)) with h = c |c_out(s,t)| sqrt(D)
  imm.estimator = "v"             # MMD^2 per group: v (all M x M pairs, the paper) | u (pairs i != j, unbiased)
  imm.a = 1.0                     # w(s,t) = 1/2 sigmoid(b - lambda_t) (-dlambda_t/dt) alpha_t^a / (alpha_t^2 + sigma_t^2)
  imm.b = 4.0
  imm.time_conditioning = "identity"  # the second time input: identity (s) | stride (t - s)
  imm.drop_target_labels = False  # also give the target pass the dropped labels
  imm.target_full_precision = True  # target pass in float32 whatever model.compute_dtype
  # objective.name = kdiff (specs/kdiff.md): u = k·x - (1-k)·n scored as a velocity with the clamp
  # objective.min_divisor (0.05); k = sigmoid(w_k), w_k trained with the net (no decay, in the EMA).
  objective.kdiff = kdiff = ml_collections.ConfigDict()
  kdiff.learnable = True          # False: k fixed at k_init (0 = eps, 0.5 = v, 1 = x baselines)
  kdiff.k_init = 0.5              # learnable: k_init in (0, 1)
  kdiff.w_k_scale = 1.0           # k = sigmoid(w_k_scale·w_k): multiplies the speed of k under Adam
  kdiff.time_dependent = False    # k(t): logit linear in t, w_k of shape [2] (worse in the paper)

  # --- optimizer: optax AdamW with linear warm-up, then constant or cosine.
  config.optimizer = optimizer = ml_collections.ConfigDict()
  optimizer.learning_rate = 1e-4
  optimizer.lr_schedule = "constant"  # constant | cosine
  optimizer.warmup_steps = 0
  optimizer.b1 = 0.9
  optimizer.b2 = 0.999
  optimizer.eps = 1e-8
  optimizer.weight_decay = 0.0    # decays arrays with ndim >= 2 only (no biases, norms, scalars)
  optimizer.grad_clip_norm = 0.0  # 0 = no clipping

  # --- training: the loop.
  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 256       # global batch, over all hosts and devices
  training.num_steps = 1000
  training.ema_decays = (0.9999,)  # one EMA pytree per decay
  training.log_every = 50         # metrics are averaged over log_every steps ...
  training.per_step_metrics = ("k",)  # ... except these, written at every step (k-Diff's k)
  training.sample_every = 0       # steps between sample-grid PNGs; 0 = only at the end
  training.checkpoint_every = 500

  # --- sampling: sample grids during training and main.py --mode=sample.
  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.method = "heun"        # see kdiff_jax.samplers
  sampling.num_steps = 32
  sampling.grid = "uniform_t"     # see kdiff_jax.samplers
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
      rho=7.0,                    # grid karras: the ramp's exponent
      shift=3.0,                  # grid shift: t' = a·t/(1 + (a-1)·t)
  ))
  sampling.guidance_scale = 1.0   # 1 = no guidance
  sampling.guidance_interval = (0.0, 1.0)  # guidance only for t in this interval
  sampling.grid_size = 8          # the PNG holds grid_size x grid_size samples
  sampling.use_ema = True
  sampling.num_samples = 64       # main.py --mode=sample
  sampling.classes = ()           # main.py --mode=sample: classes to cycle through; () = all
  sampling.seed = 0
  sampling.imm_method = "pushforward"  # objective.name = imm: pushforward | restart
  sampling.imm_grid = "uniform_t"  # objective.name = imm: uniform_t | karras | cifar (1-2 steps)

  # --- mesh: device mesh and logical-axis rules. -1 = all remaining devices.
  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1
  mesh.fsdp = 1
  mesh.tensor = 1
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
  export.use_ema = True           # the EMA weights of the first decay; False: the raw weights
  export.output_dir = ""          # "" = <workdir>/export

  return config

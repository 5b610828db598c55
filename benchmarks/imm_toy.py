"""IMM, MeanFlow and TVM against flow matching on 2-D toy data, at 1, 2, 4 and 8 steps
(docs/objectives/imm.md, "Checks").

Every objective trains the same time-conditioned MLP (model.name = 'mlp') for the same steps,
batch and optimizer, through the real trainer (train.setup / init_state / make_train_step),
unconditionally (every label 0, no dropout), with data ~ sample_toy2d and noise std 1 for all.
IMM adds the embedder of its second time s; MeanFlow that of h = t - r, with the raw t and h
embedded (model.time_scale = 1), (t, r) logit-normal(-0.4, 1) as meanflow_digits, 75% rows with
r = t, adaptive weight p = 1, and no guidance (omega = 1, kappa = 0); TVM that of h = t - s and
a guidance embedder (model.guidance_embedder) fed beta = 1 (cfg fixed at 1: the target is the
plain velocity e - x), its draws and teacher EMA (0.99) as the schema's defaults. iMF is not on
the toys: its objective needs the in-context imf_dit backbone (u and v heads, guidance and
interval tokens), which takes images, not points. Sampling, N model calls each (equal NFE): IMM
pushforward on the uniform grid T = 0.994 -> 0, FM Euler, MeanFlow mean_flow and TVM tvm on
t = 1 -> 0.

Quality: the energy distance (V-statistic, Szekely & Rizzo 2004)
  ED(X, Y) = 2·mean|X - Y| - mean|X - X'| - mean|Y - Y'|
between n model samples and n fresh data points, averaged over seeds; the noise floor is ED
between two fresh data sets of the same size (what a perfect model scores).

Settings: the paper's kernel scales (c = objective.imm.bandwidth = 1 for both kernels), M = 8
particles per group (M = 4 left 4-8 step samples more concentrated; M = 32 is no better than
8, see below), and 16000 steps (IMM's many-step maps converge later than its one-step map).

The unbiased MMD^2_u (--estimator=u: pairs i != j only, which drops the paired particles' terms)
trains worse with both kernels. 8gaussians (floor 1.94), ED x1e-3 at 1/2/4/8 steps, 2-core CPU:

  estimator   Laplace                     RBF
  v (default) 26.4 / 6.2 / 5.7 / 5.7      88.6 / 4.5 / 1.9 / 2.6
  u           74.7 / 14.2 / 15.1 / 18.2   43.8 / 19.0 / 26.1 / 31.7

The paired terms K(y_t^i, y_r^i), a low-variance pull of each particle toward its own target,
carry much of the training signal.

At 4-8 steps IMM-RBF reaches 1.0-1.4x the floor; IMM-Laplace stays near 3x on 8gaussians (its
samples too concentrated). Not the cause, measured on 8gaussians (ED x1e-3 at 1/2/4/8 steps):
finite-M bias (M = 32, batch 512: 12.8 / 5.9 / 5.8 / 5.9), kernel width (c = 64, 2 seeds,
floor 2.68: 16.2 / 4.7 / 4.8 / 5.1), training length (32000 steps: 28.2 / 8.0 / 7.3 / 7.0).

  python benchmarks/imm_toy.py [--toys=8gaussians,moons] [--steps=16000] [--group_size=8]
      [--models=imm_laplace,imm_rbf,fm,meanflow,tvm]
"""
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.distances import energy_distance  # noqa: E402
from configs import default  # noqa: E402
from kdiff_jax import parallel, sampling, train  # noqa: E402
from kdiff_jax.data import builtin  # noqa: E402

flags.DEFINE_list("toys", ["8gaussians", "moons"], "Toy distributions (builtin.TOY_NAMES).")
MODELS = {"fm": "FM (Euler)", "imm_laplace": "IMM Laplace", "imm_rbf": "IMM RBF",
          "meanflow": "MeanFlow", "tvm": "TVM"}

flags.DEFINE_list("models", ["imm_laplace", "imm_rbf", "fm", "meanflow", "tvm"],
                  " | ".join(MODELS) + ".")
flags.DEFINE_list("sample_steps", ["1", "2", "4", "8"], "Sampling steps (= NFE).")
flags.DEFINE_integer("steps", 16000, "Training steps of every model.")
flags.DEFINE_integer("batch_size", 256, "Global batch (IMM: batch_size / group_size groups).")
flags.DEFINE_integer("width", 256, "MLP width.")
flags.DEFINE_integer("depth", 3, "MLP residual blocks.")
flags.DEFINE_float("learning_rate", 3e-4, "Peak learning rate (cosine decay, 100 warm-up steps).")
flags.DEFINE_integer("group_size", 8, "IMM particles per group (M).")
flags.DEFINE_float("bandwidth", 1.0, "IMM kernel scale multiple c (objective.imm.bandwidth).")
flags.DEFINE_enum("estimator", "v", ["v", "u"], "IMM MMD^2 estimator (objective.imm.estimator).")
flags.DEFINE_integer("num_samples", 2000, "Samples per energy-distance estimate.")
flags.DEFINE_integer("seeds", 3, "Energy-distance estimates averaged per cell.")
FLAGS = flags.FLAGS


def toy_config(model, toy_name):
  """The shared config; `model` picks the objective (and IMM's kernel)."""
  config = default.get_config()
  config.data.name = "toy2d"
  config.data.toy_name = toy_name
  config.data.channels = 2          # the MLP's input: 2-D points
  config.data.num_classes = 1       # unconditional: every label 0
  config.model.name = "mlp"
  config.model.mlp_width = FLAGS.width
  config.model.mlp_depth = FLAGS.depth
  config.objective.noise_std = 1.0
  config.objective.label_dropout = 0.0
  config.sampling.guidance_scale = 1.0  # no null class was trained: guidance would extrapolate noise
  config.optimizer.learning_rate = FLAGS.learning_rate
  config.optimizer.warmup_steps = 100
  config.optimizer.lr_schedule = "cosine"
  config.training.batch_size = FLAGS.batch_size
  config.training.num_steps = FLAGS.steps
  config.training.ema_decays = (0.999,)
  config.mesh.data = 1
  if model not in MODELS:
    raise ValueError(f"--models: {model!r} is not one of {list(MODELS)}")
  config.sampling.grid = "uniform_t"  # every model: N calls on t_start -> 0
  config.sampling.t_start, config.sampling.t_end = 1.0, 0.0
  if model == "fm":
    config.sampling.method = "euler"
  elif model == "meanflow":
    config.model.second_time_embedder = True  # h = t - r
    config.model.time_scale = 1.0             # MeanFlow embeds the raw t and h
    config.objective.name = "meanflow"
    config.objective.time_sampling = "logit_normal"  # (t, r) as meanflow_digits: N(-0.4, 1)
    config.objective.logit_normal_mean = -0.4
    config.objective.meanflow.omega, config.objective.meanflow.kappa = 1.0, 0.0  # no guidance
    config.sampling.method = "mean_flow"
  elif model == "tvm":
    config.model.second_time_embedder = True  # h = t - s
    config.model.guidance_embedder = True     # beta, always 1 here
    config.model.time_scale = 1.0             # TVM embeds the raw t, h and beta
    config.objective.name = "tvm"
    config.objective.tvm.cfg_draw = "fixed"
    config.objective.tvm.cfg = 1.0            # beta = 1: the plain velocity target e - x
    config.sampling.method = "tvm"
  else:
    config.model.second_time_embedder = True
    config.objective.name = "imm"
    config.objective.t_min, config.objective.t_max = 0.0, 0.994
    config.objective.imm.kernel = model.split("_")[1]
    config.objective.imm.group_size = FLAGS.group_size
    config.objective.imm.bandwidth = FLAGS.bandwidth
    config.objective.imm.estimator = FLAGS.estimator
    config.sampling.method = "pushforward"
    config.sampling.t_start = 0.994
  return config


def train_model(config):
  """(setup, EMA params, seconds) after config.training.num_steps steps on one device."""
  setup = train.setup(config, jax.devices()[:1])
  state = train.init_state(setup)
  step = train.make_train_step(setup)
  sharding = parallel.batch_sharding(setup.mesh, config.mesh.rules)
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  for _ in range(config.training.num_steps):
    points, _ = builtin.sample_toy2d(config.data.toy_name, rng, config.training.batch_size)
    batch = {"image": jax.device_put(points, sharding),
             "label": jax.device_put(np.zeros(len(points), np.int32), sharding)}
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  return setup, train.sampling_params(state, config), time.perf_counter() - start


def sampler(setup, num_steps):
  """jit(sample(params, key)) of the objective rebuilt with sampling.num_steps = num_steps."""
  config = setup.config.copy_and_resolve_references()
  config.sampling.num_steps = num_steps
  sample_fn = sampling.build(config, setup.objective.description, setup.model.apply)
  shape = (FLAGS.num_samples, config.data.channels)
  labels = jnp.zeros((FLAGS.num_samples,), jnp.int32)

  def sample(params, key):
    key_noise, key_sampler = jax.random.split(key)
    noise = config.objective.noise_std * jax.random.normal(key_noise, shape, jnp.float32)
    return sample_fn(params, noise, labels, key_sampler)
  return jax.jit(sample)


def fresh_data(toy_name, seed):
  rng = np.random.default_rng((12345, seed))
  return builtin.sample_toy2d(toy_name, rng, FLAGS.num_samples)[0]


def main(argv):
  del argv
  jax.config.update("jax_threefry_partitionable", True)
  steps = [int(n) for n in FLAGS.sample_steps]
  print(f"MLP width {FLAGS.width} depth {FLAGS.depth}, {FLAGS.steps} steps of batch "
        f"{FLAGS.batch_size}; energy distance (x1e-3) of {FLAGS.num_samples} samples vs fresh "
        f"data, mean of {FLAGS.seeds} seeds; NFE = steps")
  for toy_name in FLAGS.toys:
    floor = np.mean([energy_distance(fresh_data(toy_name, 2 * i), fresh_data(toy_name, 2 * i + 1))
                     for i in range(FLAGS.seeds)])
    print(f"\n{toy_name}: noise floor (data vs data) {floor * 1e3:.2f}")
    print("| model | train (s) | " + " | ".join(f"{n} step{'s' * (n > 1)}" for n in steps) + " |")
    print("|---|---|" + "---|" * len(steps))
    for model in FLAGS.models:
      s, params, seconds = train_model(toy_config(model, toy_name))
      cells = []
      for n in steps:
        sample = sampler(s, n)
        distances = [energy_distance(sample(params, jax.random.key(i)), fresh_data(toy_name, 2 * i))
                     for i in range(FLAGS.seeds)]
        cells.append(f"{np.mean(distances) * 1e3:.2f}")
      print(f"| {MODELS[model]} | {seconds:.0f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  app.run(main)

"""Few-step methods on the digits demo at an equal training budget: conditional accuracy at N steps.

Each method trains from its shipped digits config through the real command, on one CPU device,

  python main.py --config=configs/<config>.py --workdir=<workdir_root>/<method>
      --config.training.num_steps=<steps> --config.training.batch_size=<batch>

with the same steps and batch for all (default 1500 x 128, the budget of the FM, IMM and MeanFlow
demos; the iMF, pMF and TVM demos ship shorter runs), and everything else as
shipped (model, objective, optimizer, EMA). Grids and checkpoints every 500 steps for all, so the
printed wall time of the command (start-up, compiles, grids and checkpoints included) compares the
methods' step costs on this machine. A workdir that already holds the run (its few_step.json) is
reused, so `--methods` / `--nfe` re-score without retraining.

Scores of 500 class-conditional samples (labels cycling 0-9, seed 123, the EMA weights,
sampling.num_steps = N: the samples of tests/test_demo.py's `conditional_accuracy`):
* conditional accuracy: the fraction that the demo tests' digit classifier (a logistic
  regression fitted on the real digits, never on samples) labels with their class, i.e.
  `conditional_accuracy(config, workdir)`. A linear classifier also labels a blurred class
  mean correctly, so this measures the conditioning, hardly the fidelity;
* the class-wise energy distance (V-statistic, Szekely & Rizzo 2004, as benchmarks/imm_toy.py)
    ED(X, Y) = 2·mean|X - Y| - mean|X - X'| - mean|Y - Y'|
  in pixel space (64-D, x/8 - 1) between the 50 samples of class c and the even-numbered real
  digits of class c, averaged over the 10 classes: blur and lost diversity raise it. The floor
  (a perfect sampler's score) is the same statistic for 50 of the odd-numbered real digits.
Samplers, each on the uniform grid of its config:

  fm       flow matching, sampling.method = 'euler' (first-order step on the velocity, t = 1 -> 0),
           classifier-free guidance w = 2 of digits_fm (whose own sampler is Heun): 2 network
           evaluations per step (conditional and null rows in one call of twice the batch)
  imm      IMM pushforward, T = 0.994 -> 0, guidance w = 1.5 on the map: 2 evaluations per step
  meanflow MeanFlow mean_flow, z <- z - (t - r)·u; guidance trained in (omega 1, kappa 0.5): 1
  imf      iMF mean_flow with omega = 3 and the interval [0, 1] as network inputs (the v head
           skipped): 1
  pmf      pMF (iMF with an x-predicting network, perceptual losses off) likewise: 1
  tvm      TVM, beta = 1/cfg = 1/2 as the network's input: 1

With --unguided (default on), FM and IMM are also scored at w = 1 (one evaluation per step, the
same network), so a column can be read at an equal number of network evaluations as well, and
iMF and pMF at omega = 1 (their network input; omega is drawn on [1, 8] in training). MeanFlow's guidance
is fixed in training, and TVM at cfg 1 would feed beta = 1 with a real label, which its training
(beta = 1 only on dropped-label rows) never sees: no such rows for them.

  python benchmarks/few_step.py [--methods=fm,imm,meanflow,imf,pmf,tvm] [--steps=1500]
      [--batch_size=128] [--nfe=1,2,4] [--workdir_root=/tmp/few_step] [--nounguided]
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import importlib  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from benchmarks.distances import class_energy_distance, energy_distance, real_digits  # noqa: E402

# method -> (config module, display name, network evaluations per step as configured)
METHODS = {
    "fm": ("digits_fm", "FM (Euler, w = 2)", 2),
    "imm": ("imm_digits", "IMM (pushforward, w = 1.5)", 2),
    "meanflow": ("meanflow_digits", "MeanFlow", 1),
    "imf": ("imf_digits", "iMF (omega = 3)", 1),
    "pmf": ("pmf_digits", "pMF (omega = 3)", 1),
    "tvm": ("tvm_digits", "TVM (cfg 2)", 1),
}
UNGUIDED = {"fm": "FM (Euler, w = 1)", "imm": "IMM (pushforward, w = 1)",
            "imf": "iMF (omega = 1)", "pmf": "pMF (omega = 1)"}

flags.DEFINE_list("methods", list(METHODS), f"Methods: {', '.join(METHODS)}.")
flags.DEFINE_integer("steps", 1500, "Training steps of every method.")
flags.DEFINE_integer("batch_size", 128, "Training batch of every method.")
flags.DEFINE_list("nfe", ["1", "2", "4"], "Sampling steps N.")
flags.DEFINE_string("workdir_root", "/tmp/few_step", "One workdir per method under it (reused).")
flags.DEFINE_bool("unguided", True, "Also score FM, IMM and iMF without guidance (w = 1).")
flags.DEFINE_integer("num_samples", 500, "Samples per accuracy.")
FLAGS = flags.FLAGS


def method_config(method):
  """The shipped digits config with the shared budget and the Euler sampler for FM."""
  config = importlib.import_module(f"configs.{METHODS[method][0]}").get_config()
  config.training.num_steps = FLAGS.steps
  config.training.batch_size = FLAGS.batch_size
  if method == "fm":
    config.sampling.method = "euler"
  return config


def train(method, workdir):
  """Runs main.py once (or reuses the workdir's run); {'seconds': wall time, 'command': ...}."""
  record_path = os.path.join(workdir, "few_step.json")
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
    if (record["steps"], record["batch_size"]) == (FLAGS.steps, FLAGS.batch_size):
      return record
    raise ValueError(f"--workdir_root: {workdir} holds a run of {record['steps']} x "
                     f"{record['batch_size']}, not {FLAGS.steps} x {FLAGS.batch_size}: use "
                     "another --workdir_root")
  command = [sys.executable, "main.py", f"--config=configs/{METHODS[method][0]}.py",
             f"--workdir={workdir}", f"--config.training.num_steps={FLAGS.steps}",
             f"--config.training.batch_size={FLAGS.batch_size}",
             "--config.training.sample_every=500", "--config.training.checkpoint_every=500"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  start = time.perf_counter()
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if result.returncode:
    raise RuntimeError(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-3000:]}")
  record = dict(steps=FLAGS.steps, batch_size=FLAGS.batch_size, seconds=seconds,
                command=" ".join(command[1:]))
  with open(record_path, "w") as f:
    json.dump(record, f)
  return record


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # the checkpoint library's INFO lines
  unknown = sorted(set(FLAGS.methods) - set(METHODS))
  if unknown:
    raise ValueError(f"--methods={unknown}: allowed values are {list(METHODS)}")
  from tests.test_demo import conditional_samples, digit_classifier
  classifier, real = digit_classifier(), real_digits()
  per_class = FLAGS.num_samples // 10
  floor = np.mean([energy_distance(real[c][1][:per_class], real[c][0]) for c in real])
  nfe = [int(n) for n in FLAGS.nfe]
  rows = []
  for method in FLAGS.methods:
    workdir = os.path.join(FLAGS.workdir_root, method)
    record = train(method, workdir)
    print(f"{method}: trained in {record['seconds']:.0f} s: {record['command']}", flush=True)
    variants = [(METHODS[method][1], METHODS[method][2], None)]
    if FLAGS.unguided and method in UNGUIDED:
      variants.append((UNGUIDED[method], 1, 1.0))
    for name, evaluations, guidance_scale in variants:
      accuracies, distances = [], []
      for n in nfe:
        config = method_config(method)
        config.sampling.num_steps = n
        if guidance_scale is not None:
          config.sampling.guidance_scale = guidance_scale
        images, labels = conditional_samples(config, workdir, FLAGS.num_samples)
        accuracies.append(float(np.mean(classifier.predict(images) == labels)))
        distances.append(class_energy_distance(images, labels, real))
      rows.append((name, evaluations, record["seconds"], accuracies, distances))
      print(f"  {name}: " + ", ".join(f"{n} steps {a:.3f} / {d:.3f}"
                                      for n, a, d in zip(nfe, accuracies, distances)), flush=True)

  header = " | ".join(f"{n} step{'s' * (n > 1)}" for n in nfe)
  print(f"\nDigits, {FLAGS.steps} steps x batch {FLAGS.batch_size} for every method, "
        f"{FLAGS.num_samples} samples at N sampling steps: conditional accuracy / class-wise "
        f"energy distance to real digits (floor, real vs real: {floor:.3f})")
  print(f"| method | evals / step | train (s) | {header} |")
  print("|---|---|---|" + "---|" * len(nfe))
  for name, evaluations, seconds, accuracies, distances in rows:
    print(f"| {name} | {evaluations} | {seconds:.0f} | "
          + " | ".join(f"{a:.3f} / {d:.3f}" for a, d in zip(accuracies, distances)) + " |")


if __name__ == "__main__":
  app.run(main)

"""kdiff_jax entry point: python main.py --config=configs/digits_fm.py --workdir=/tmp/run

Run the same command on every worker of a TPU VM pod; JAX finds the other workers itself.
Override any field: --config.training.num_steps=100. After training, --mode=sample, eval and
export read the run's own config from its latest checkpoint, so they need no --config; the
--config.* overrides still apply (e.g. --config.sampling.num_steps=4).

A mistake (a missing config file, an unknown or invalid field, an unusable workdir, a resume
that changes what the checkpoint means) ends in one line "error: ..." and exit code 2;
--verbosity=1 shows the traceback and the libraries' INFO logs (Orbax, JAX, TensorFlow), which
are off otherwise.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

MODES = ("train", "sample", "eval", "export", "import", "encode_latents")
# Modes that read a trained run, whose checkpoint holds its config.
AFTER_TRAINING = ("sample", "eval", "export")
# Modes that write a new run into --workdir.
WRITING = ("train", "import")
# --import_from file -> (state_dict, config or None), read once when it also gave the config.
IMPORTED = {}

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and samples go here.")
flags.DEFINE_enum("mode", "train", MODES,
                  "train: train (resuming from --workdir); sample: sample a checkpoint in --workdir "
                  "(config.sampling); eval: FID/IS/precision/recall of a checkpoint (config.eval); "
                  "export: write a checkpoint as PyTorch files (config.export); import: write "
                  "--import_from (a DiT / JiT state_dict, or a released IMM pickle, whose config it "
                  "carries) as step 0 of a new --workdir; "
                  "encode_latents: encode data.tfds_name with the VAE into data.latents_path.")
flags.DEFINE_list("allow_config_change", [], "Fields a resumed run may change although they alter "
                  "the checkpoint's meaning (e.g. training.batch_size,seed).")
flags.DEFINE_string("import_from", "", "--mode=import: a lumalabs/imm pickle (.pkl / .pt of "
                    "{'ema': IMMPrecond}; no --config needed) or a DiT / JiT / IMMPrecond "
                    "state_dict (.pt, .safetensors) to write as the step-0 checkpoint of --workdir.")
flags.DEFINE_bool("drop_learned_sigma", False, "--mode=import of a learn_sigma=True DiT: keep the "
                  "first C output channels (the ε mean).")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for several processes "
                    "off TPU (or set JAX_COORDINATOR_ADDRESS); TPU pods need nothing.")
flags.DEFINE_integer("num_processes", 0, "Number of processes (or JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", -1, "This process's id (or JAX_PROCESS_ID).")


class UsageError(Exception):
  """A mistake on the command line or in the config: one line, exit code 2."""


def fail(error: BaseException, *, verbose: bool, code: int = 2):
  """Print `error` as one line (the traceback too when verbose) and exit with `code`."""
  if verbose:
    raise error
  message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def _verbose(argv) -> bool:
  for arg in argv[1:]:
    for prefix in ("--verbosity=", "-verbosity=", "--v=", "-v="):
      if arg.startswith(prefix):
        return arg[len(prefix):].lstrip("-").isdigit() and int(arg[len(prefix):]) >= 1
  return False


def _config_file(argv):
  """The --config argument, or None."""
  for i, arg in enumerate(argv[1:], 1):
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
  return None


def define_config_flag(argv) -> None:
  """--config: an experiment file; for sample / eval / export without one, the config saved in
  --workdir's latest checkpoint (read without starting JAX), with --config.* overrides on it.

  Checks what absl and ml_collections would only report with a traceback: the file exists and
  every --config.<field> override names a field of the schema.
  """
  from kdiff_jax import schema
  overrides = [arg.lstrip("-").split("=", 1)[0][len("config."):] for arg in argv[1:]
               if arg.lstrip("-").startswith("config.")]
  schema.check_field_names(overrides)
  path = _config_file(argv)
  early = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "", flag_values=early)
  flags.DEFINE_string("mode", "train", "", flag_values=early)
  flags.DEFINE_string("import_from", "", "", flag_values=early)
  early(argv, known_only=True)
  if path is None and early.mode in AFTER_TRAINING and early.workdir:
    from kdiff_jax import checkpoint
    config_flags.DEFINE_config_dict("config", checkpoint.load_config(early.workdir),
                                    "The run's own config (from --workdir).", lock_config=True)
    return
  if path is None and early.mode == "import" and early.import_from:
    from kdiff_jax.export import pretrained
    IMPORTED[early.import_from] = pretrained.read(early.import_from)
    config = IMPORTED[early.import_from][1]
    if config is None:
      raise UsageError(f"--import_from={early.import_from} is a state_dict: give the model's "
                       "--config (only pickled IMMPrecond files carry their settings)")
    config_flags.DEFINE_config_dict("config", config, "The imported file's config.",
                                    lock_config=True)
    return
  if path is not None:
    file = path.split(":", 1)[0]
    if os.path.isdir(file):
      raise UsageError(f"--config={path}: {file} is a directory; give a config file such as "
                       "configs/digits_fm.py")
    if not os.path.isfile(file):
      raise UsageError(f"--config={path}: no such file ({os.path.abspath(file)})")
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)


def parse_flags(argv):
  """absl's flag parsing with one-line errors (see the module docstring)."""
  verbose = _verbose(argv)
  try:
    define_config_flag(argv)
    remaining = FLAGS(argv)
    if FLAGS.config is None:
      raise UsageError(f"--mode={FLAGS.mode} needs --config=configs/<experiment>.py")
    if not FLAGS.workdir:
      raise UsageError("--workdir is empty: give the run's directory (a local path or gs://...)")
    return remaining
  except (UsageError, ValueError, OSError, KeyError, AttributeError, flags.Error) as error:
    fail(error, verbose=verbose)


def check_workdir(workdir: str, mode: str) -> None:
  """A writing mode can create and write `workdir`; a reading mode finds it (and creates nothing)."""
  from etils import epath
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise UsageError(f"--workdir={workdir} is a file, not a directory")
  if mode == "encode_latents":  # writes to data.latents_path only
    return
  if mode not in WRITING:
    if not path.is_dir():
      raise UsageError(f"--workdir={workdir} does not exist: train there first (--mode=train)")
    return
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_probe_{os.getpid()}"
    probe.write_text("")
    probe.unlink()
  except OSError as error:
    raise UsageError(f"--workdir={workdir} is not writable ({error.strerror or error}): choose "
                     "another directory or fix its permissions") from error


def run(config) -> None:
  if FLAGS.mode == "train":
    from kdiff_jax import train
    train.train_and_evaluate(config, FLAGS.workdir,
                             source=config_flags.get_config_filename(FLAGS["config"]),
                             allow_config_change=FLAGS.allow_config_change)
  elif FLAGS.mode == "sample":
    from kdiff_jax import generation
    generation.generate(config, FLAGS.workdir)
  elif FLAGS.mode == "eval":
    from kdiff_jax import evaluate
    evaluate.evaluate(config, FLAGS.workdir)
  elif FLAGS.mode == "export":
    from kdiff_jax.export import checkpoints
    checkpoints.export_checkpoint(config, FLAGS.workdir)
  elif FLAGS.mode == "import":
    from kdiff_jax.export import checkpoints, pretrained
    if not FLAGS.import_from:
      raise UsageError("--mode=import needs --import_from=<IMM .pkl, or a state_dict .pt or "
                       ".safetensors>")
    from kdiff_jax import console
    state_dict, carried = IMPORTED.get(FLAGS.import_from) or pretrained.read(FLAGS.import_from)
    if carried is not None:
      console.info("import: %s: %s", FLAGS.import_from, pretrained.describe(config))
    net = checkpoints.import_state_dict(state_dict, config,
                                        drop_learned_sigma=FLAGS.drop_learned_sigma)
    checkpoints.init_workdir(config, FLAGS.workdir, net)
  elif FLAGS.mode == "encode_latents":
    from kdiff_jax import encoding
    encoding.encode_tfds(config)


def main(argv):
  del argv
  import jax
  from kdiff_jax import actions, checkpoint, config as config_lib, console, parallel
  verbose = FLAGS.verbosity >= 1
  console.quiet_libraries(verbose=verbose)
  jax.config.update("jax_threefry_partitionable", True)
  try:
    config_lib.validate(FLAGS.config)   # before anything is created or started
    check_workdir(FLAGS.workdir, FLAGS.mode)
    parallel.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                         FLAGS.process_id)
    run(FLAGS.config)
  except actions.NonFiniteLossError as error:
    fail(error, verbose=verbose, code=1)
  except (UsageError, ValueError, OSError, checkpoint.CheckpointError) as error:
    fail(error, verbose=verbose)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)

"""kdiff_jax entry point: python main.py --config=configs/digits_fm.py --workdir=/tmp/run

Run the same command on every worker of a TPU VM pod; JAX finds the other workers itself.
Override any field: --config.training.num_steps=100. --mode=sample, eval and export read the
run's own config from its newest checkpoint, so they need no --config; --config.* overrides
still apply (e.g. --config.sampling.num_steps=4). The modes are kdiff_jax/modes.py.

A mistake (a missing config file, an unknown or invalid field, an unusable workdir, a mesh or
batch the devices cannot hold, a resume that changes what the checkpoint means) ends in one line
"error: ..." and exit code 2, and leaves no workdir that this run created. While a run works,
the libraries' messages and the tracebacks of their background threads go to <workdir>/log.txt
(log.process<i>.txt on the other processes), so that the console keeps its own lines and a
failure's one line is the last. --verbosity=1 puts all of it, and every traceback, on the
console instead.

`parse_flags` is the one place that reads argv, before absl parses it:
* --config=FILE must name a file (absl would raise a traceback);
* every --config.<field> must name a field of the schema (schema.check_field_names: the known
  fields and the closest match);
* without --config, the mode's own config (modes.config_source): --mode=sample/eval/export take
  the one saved in --workdir's checkpoint (--mode=train too where it has one), --mode=import the
  one a released IMM or TVM pickle or iMF checkpoint carries.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from kdiff_jax import modes  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and samples go here.")
flags.DEFINE_enum("mode", "train", list(modes.MODES),
                  "train: train (resuming from --workdir); sample: sample a checkpoint in --workdir "
                  "(config.sampling); eval: FID/IS/precision/recall of a checkpoint (config.eval); "
                  "export: write a checkpoint as PyTorch files (config.export); import: write "
                  "--import_from (a DiT / JiT state_dict, or a released IMM or TVM pickle, whose "
                  "config it carries) as step 0 of a new --workdir; "
                  "encode_latents: encode data.tfds_name with the VAE into data.latents_path.")
flags.DEFINE_list("allow_config_change", [], "Fields a resumed run may change although they alter "
                  "the checkpoint's meaning (e.g. training.batch_size,seed).")
flags.DEFINE_string("import_from", "", "--mode=import: a lumalabs/imm or lumalabs/tvm pickle "
                    "(.pkl / .pt of {'ema': IMMPrecond} or {'ema' | 'net': TVMWrapper}) or a "
                    "Lyy-iiis/imeanflow flax checkpoint (checkpoint_<step>, or its directory); no "
                    "--config needed for these; or a DiT / JiT / IMMPrecond state_dict (.pt, "
                    ".safetensors) to write as the step-0 checkpoint of --workdir.")
flags.DEFINE_bool("drop_learned_sigma", False, "--mode=import of a learn_sigma=True DiT: keep the "
                  "first C output channels (the ε mean).")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for several processes "
                    "off TPU (or set JAX_COORDINATOR_ADDRESS); TPU pods need nothing.")
flags.DEFINE_integer("num_processes", 0, "Number of processes (or JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", -1, "This process's id (or JAX_PROCESS_ID).")


FROM_CONFIG_FILE = [True]   # False where parse_flags took the mode's own config (no --config)


def fail(error: BaseException, *, verbose: bool, code: int = 2):
  """Print `error` as one line "error: ..." on the console (the traceback when verbose), exit."""
  if verbose:
    raise error
  from kdiff_jax import console
  message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  console.error(f"error: {message}")
  sys.exit(code)


def parse_flags(argv):
  """--config from where the mode takes it, then absl's parsing (module docstring); a mistake in
  one line (--verbosity=1 in argv: with its traceback)."""
  verbose = any(arg.lstrip("-").split("=", 1)[0] in ("verbosity", "v")
                and arg.split("=", 1)[-1].isdigit() and int(arg.split("=", 1)[-1]) >= 1
                for arg in argv[1:] if "=" in arg)
  from kdiff_jax import schema
  from kdiff_jax.checkpoint import CheckpointError
  try:
    schema.check_field_names([arg.lstrip("-").split("=", 1)[0][len("config."):]
                              for arg in argv[1:] if arg.lstrip("-").startswith("config.")])
    early = flags.FlagValues()   # the flags that decide where the config comes from
    for name, default in (("config", None), ("workdir", None), ("mode", "train"),
                          ("import_from", "")):
      flags.DEFINE_string(name, default, "", flag_values=early)
    early(argv, known_only=True)
    source = (modes.config_source(early.mode, early.workdir, early.import_from)
              if early.config is None else None)
    if source is not None:
      config_flags.DEFINE_config_dict("config", source[0], source[1], lock_config=True)
      FROM_CONFIG_FILE[:] = [False]
    else:
      if early.config is not None:
        file = early.config.split(":", 1)[0]
        if not os.path.isfile(file):
          raise modes.UsageError(f"--config={early.config}: " + (
              f"{file} is a directory; give a config file such as configs/digits_fm.py"
              if os.path.isdir(file) else f"no such file ({os.path.abspath(file)})"))
      config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    remaining = FLAGS(argv)
    if FLAGS.config is None:
      raise modes.UsageError(f"--mode={FLAGS.mode} needs --config=configs/<experiment>.py")
    if not FLAGS.workdir:
      raise modes.UsageError("--workdir is empty: give the run's directory (a local path or "
                             "gs://...)")
    return remaining
  except (modes.UsageError, ValueError, OSError, KeyError, AttributeError, flags.Error,
          CheckpointError) as error:
    fail(error, verbose=verbose)


def main(argv):
  del argv
  import jax
  from kdiff_jax import actions, checkpoint, config as config_lib, console, parallel
  from kdiff_jax.workdir import Workdir
  verbose = FLAGS.verbosity >= 1
  console.quiet_libraries(verbose=verbose)
  jax.config.update("jax_threefry_partitionable", True)
  workdir = None
  try:
    config_lib.validate(FLAGS.config)   # once, before anything is created or started
    workdir = Workdir.prepare(FLAGS.workdir, FLAGS.mode)
    parallel.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                         FLAGS.process_id)
    if not verbose and FLAGS.mode != "encode_latents":
      workdir.divert_library_output()
    modes.MODES[FLAGS.mode](
        FLAGS.config, FLAGS.workdir,
        config_file=(config_flags.get_config_filename(FLAGS["config"]) if FROM_CONFIG_FILE[0]
                     else ""),
        allow_config_change=FLAGS.allow_config_change, import_from=FLAGS.import_from,
        drop_learned_sigma=FLAGS.drop_learned_sigma)
  except actions.NonFiniteLossError as error:
    fail(error, verbose=verbose, code=1)
  except (modes.UsageError, ValueError) as error:   # a mistake: what this run created goes
    if workdir is not None:
      workdir.undo()
    fail(error, verbose=verbose)
  except (OSError, checkpoint.CheckpointError) as error:
    fail(error, verbose=verbose)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)

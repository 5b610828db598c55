"""python -m kdiff_jax.export: export a checkpoint to PyTorch, or import a PyTorch DiT / JiT.

  python -m kdiff_jax.export --workdir=W [--config=C]
      writes W/export/stepN.{safetensors,pt,json} (config.export.*); without --config the
      checkpoint's own config is used (same as main.py --mode=export --config=C --workdir=W)
  python -m kdiff_jax.export --config=C --workdir=NEW --import_from=DiT-XL-2-256x256.pt \
      [--drop_learned_sigma]
      writes the state_dict as the step-0 checkpoint of NEW; `python main.py --config=C
      --workdir=NEW` then fine-tunes it
"""
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (export: default the "
                                "checkpoint's own; import: required).", lock_config=True)
flags.DEFINE_string("workdir", None, "Export: the run's workdir. Import: a new workdir.")
flags.DEFINE_string("import_from", "", "A DiT / JiT state_dict (.pt or .safetensors) to import.")
flags.DEFINE_bool("drop_learned_sigma", False, "Import a learn_sigma=True DiT keeping the first "
                  "C output channels (the ε mean).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  import jax
  jax.config.update("jax_threefry_partitionable", True)
  from kdiff_jax.export import checkpoints
  from kdiff_jax.models import torch_weights
  if FLAGS.import_from:
    if FLAGS.config is None:
      raise app.UsageError("--import_from needs --config (the model to import into)")
    net = checkpoints.import_state_dict(torch_weights.read_state_dict(FLAGS.import_from),
                                        FLAGS.config, drop_learned_sigma=FLAGS.drop_learned_sigma)
    checkpoints.init_workdir(FLAGS.config, FLAGS.workdir, net)
  else:
    config = (FLAGS.config if FLAGS.config is not None
              else checkpoints.checkpoint_config(FLAGS.workdir))
    checkpoints.export_checkpoint(config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)

"""kdiff_jax entry point: python main.py --config=configs/digits_fm.py --workdir=/tmp/run

Run the same command on every worker of a TPU VM pod; JAX finds the other workers itself.
Override any field: --config.training.num_steps=100.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from kdiff_jax import parallel  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and samples go here.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "export", "eval", "encode_latents"],
                  "train: train (resuming from --workdir); sample: sample a checkpoint in --workdir; "
                  "export: write a checkpoint in --workdir as PyTorch files (config.export); "
                  "eval: FID/IS/precision/recall of a checkpoint in --workdir (config.eval); "
                  "encode_latents: encode data.tfds_name with the VAE into data.latents_path.")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for several processes "
                    "off TPU (or set JAX_COORDINATOR_ADDRESS); TPU pods need nothing.")
flags.DEFINE_integer("num_processes", 0, "Number of processes (or JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", -1, "This process's id (or JAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  jax.config.update("jax_threefry_partitionable", True)
  parallel.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                       FLAGS.process_id)
  logging.info("process %d/%d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  if FLAGS.mode == "train":
    from kdiff_jax import train
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  elif FLAGS.mode == "sample":
    from kdiff_jax import generation
    generation.generate(FLAGS.config, FLAGS.workdir)
  elif FLAGS.mode == "export":
    from kdiff_jax.export import checkpoints
    checkpoints.export_checkpoint(FLAGS.config, FLAGS.workdir)
  elif FLAGS.mode == "eval":
    from kdiff_jax import evaluate
    evaluate.evaluate(FLAGS.config, FLAGS.workdir)
  elif FLAGS.mode == "encode_latents":
    from kdiff_jax.data import latents
    latents.encode_tfds(FLAGS.config)


if __name__ == "__main__":
  app.run(main)

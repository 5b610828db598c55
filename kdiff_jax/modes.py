"""main.py's modes, each a function of (config, workdir, options) that calls into the library:

  train           train.train_and_evaluate, resuming from the workdir (evaluate.training_actions
                  hands the loop its FID and decoded grids)
  sample          generation.generate: samples of the checkpoint in the workdir
  eval            evaluate.evaluate: FID / IS / precision-recall of the checkpoint
  export          export.checkpoints.export_checkpoint: PyTorch files of the checkpoint
  import          --import_from (a DiT / JiT state_dict, a released IMM or TVM pickle, or an
                  iMF flax checkpoint) as step 0
  encode_latents  encoding.encode_tfds: data.tfds_name through the VAE into data.latents_path

`config_source` says where a mode's config comes from when --config is not given: the run's own
(its newest checkpoint) for sample, eval and export, and for train where the workdir has one,
the imported file's for import.
"""
from kdiff_jax import console

AFTER_TRAINING = ("sample", "eval", "export")   # read a run whose checkpoint holds its config


class UsageError(Exception):
  """A mistake on the command line or in the config: one line, exit code 2."""


# --import_from -> (state_dict, config or None), read once when it gave the config
_IMPORTED = {}


def config_source(mode: str, workdir, import_from: str):
  """(the config, what it is) a mode reads without --config, or None where it needs --config."""
  if mode in AFTER_TRAINING and workdir:
    from kdiff_jax import checkpoint
    return checkpoint.load_config(workdir), "The run's own config (from --workdir)."
  if mode == "train" and workdir:   # resuming (e.g. an imported release) with no --config
    from kdiff_jax import checkpoint
    try:
      return checkpoint.load_config(workdir), "The run's own config (resuming --workdir)."
    except FileNotFoundError:
      return None
  if mode == "import" and import_from:
    from kdiff_jax.export import pretrained
    _IMPORTED[import_from] = pretrained.read(import_from)
    if _IMPORTED[import_from][1] is None:
      raise UsageError(f"--import_from={import_from} is a state_dict: give the model's "
                       "--config (pickled IMMPrecond and TVMWrapper files carry their settings)")
    return _IMPORTED[import_from][1], "The imported file's config."
  return None


def train(config, workdir: str, *, config_file: str, allow_config_change, **_):
  from kdiff_jax import evaluate, train as train_lib
  train_lib.train_and_evaluate(config, workdir, source=config_file,
                               allow_config_change=allow_config_change,
                               sampling_actions=evaluate.training_actions)


def sample(config, workdir: str, **_):
  from kdiff_jax import generation
  generation.generate(config, workdir)


def evaluate(config, workdir: str, **_):
  from kdiff_jax import evaluate as evaluate_lib
  evaluate_lib.evaluate(config, workdir)


def export(config, workdir: str, **_):
  from kdiff_jax.export import checkpoints
  checkpoints.export_checkpoint(config, workdir)


def import_(config, workdir: str, *, import_from: str, drop_learned_sigma: bool, **_):
  from kdiff_jax.export import checkpoints, pretrained, released_tvm
  if not import_from:
    raise UsageError("--mode=import needs --import_from=<IMM .pkl, or a state_dict .pt or "
                     ".safetensors>")
  state_dict, carried = _IMPORTED.get(import_from) or pretrained.read(import_from)
  if carried is not None:
    released_tvm.check_config(carried, config)   # a TVM file's network against --config
    console.info("import: %s: %s", import_from, pretrained.describe(config))
  net = checkpoints.import_state_dict(state_dict, config, drop_learned_sigma=drop_learned_sigma)
  checkpoints.init_workdir(config, workdir, net)


def encode_latents(config, workdir: str, **_):
  del workdir
  from kdiff_jax import encoding
  encoding.encode_tfds(config)


MODES = {"train": train, "sample": sample, "eval": evaluate, "export": export,
         "import": import_, "encode_latents": encode_latents}

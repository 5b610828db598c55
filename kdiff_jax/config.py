"""Config validation: one pure function of the config, run before anything is built or compiled.

  validate(config)              raises ValueError naming the field, its value and what it must be
                                (once per config: a config it accepted is not checked again)
  check_resume(saved, config)   the changes since a checkpoint, refusing those that alter it

Every field must exist in the schema (`schema.defaults()`; an unknown one is named with the
known fields of its section and the closest match, `schema.check_field_names`). Each registry
states the rules of its own section and checks its combinations: `data`, `models`,
`objectives`, `perceptual` (its feature nets' files), `sampling` (which also checks that the
method fits the objective and builds the host-side sampling plan) and `parallel` (the mesh);
this module holds the rules of the sections no registry owns (seed, optimizer, training, eval,
checkpoint, export). Every field has a rule.
"""
from kdiff_jax import data, models, objectives, parallel, perceptual, sampling, schema
from kdiff_jax.schema import boolean, number, one_of, sequence, text

RULES = {
    "seed": number(0, integer=True),
    "optimizer.learning_rate": number(0, low_open=True),
    "optimizer.lr_schedule": one_of("constant", "cosine"),
    "optimizer.warmup_steps": number(0, integer=True),
    "optimizer.b1": number(0, 1, high_open=True),
    "optimizer.b2": number(0, 1, high_open=True),
    "optimizer.eps": number(0, low_open=True),
    "optimizer.weight_decay": number(0),
    "optimizer.grad_clip_norm": number(0, note="0 = off"),
    "training.batch_size": number(1, integer=True),
    "training.num_steps": number(0, integer=True),
    "training.ema_decays": sequence(number(0, 1, high_open=True)),
    "training.log_every": number(1, integer=True),
    "training.per_step_metrics": sequence(text()),
    "training.sample_every": number(0, integer=True, note="0 = only at the end"),
    "training.checkpoint_every": number(1, integer=True),
    "training.on_nonfinite": one_of("stop", "rollback_skip"),
    "training.max_rollbacks": number(0, integer=True),
    "training.spike_factor": number(0, note="0 = off; else > 1"),
    "eval.fid_every": number(0, integer=True, note="0 = never"),
    "eval.fid_num_samples": number(2, integer=True),
    "eval.num_samples": number(2, integer=True),
    "eval.batch_size": number(1, integer=True),
    "eval.inception_path": text(),
    "eval.reference_path": text(),
    "eval.reference_num_examples": number(2, integer=True),
    "checkpoint.max_to_keep": number(1, integer=True),
    "checkpoint.async_save": boolean(),
    "export.use_ema": boolean(),
    "export.output_dir": text(),
}

# The registries, each with RULES for its section and check(config) for its combinations.
REGISTRIES = (data, models, objectives, perceptual, sampling, parallel)

# Fields a run may change when it resumes (a warning says which): its length and cadence, the
# learning rate and its schedule, where files are read and written, sampling, evaluation, the
# mesh (checkpoints restore on any topology), how the network is computed without changing its
# weights (attention kernel, rematerialisation: e.g. a run started on CPU resumed on a GPU with
# cuDNN attention). Every other change alters the saved state or the
# meaning of the run and is refused unless named in --allow_config_change.
RESUMABLE = (
    "training.num_steps", "training.log_every", "training.per_step_metrics",
    "training.sample_every", "training.checkpoint_every", "training.on_nonfinite",
    "training.max_rollbacks", "training.spike_factor", "optimizer.learning_rate",
    "optimizer.lr_schedule", "optimizer.warmup_steps", "data.vae_path", "data.tfds_data_dir",
    "data.latent_shard_size", "data.encode_batch_size", "sampling.", "eval.", "checkpoint.",
    "export.", "mesh.", "model.attention", "model.remat", "perceptual.lpips_vgg16",
    "perceptual.lpips_heads", "perceptual.convnext",
)


def all_rules() -> dict:
  """{field: Rule} of every field of the schema (this module's and every registry's)."""
  rules = dict(RULES)
  for registry in REGISTRIES:
    rules.update(registry.RULES)
  return rules


def check(config) -> None:
  """The combinations of the sections no registry owns."""
  training, eval_ = config.training, config.eval
  if len(set(training.ema_decays)) != len(training.ema_decays):
    raise ValueError(f"training.ema_decays={tuple(training.ema_decays)}: each decay once")
  if eval_.fid_every and not eval_.inception_path:
    raise ValueError(f"eval.fid_every={eval_.fid_every} needs eval.inception_path (pytorch-fid's "
                     "pt_inception-2015-12-05-6726825d.pth or its .npz); nothing is downloaded")
  if eval_.fid_every and config.data.name == "latents":
    if not config.data.vae_path:
      raise ValueError("eval.fid_every > 0 on latents needs data.vae_path (the decoder)")
    if not eval_.reference_path:
      raise ValueError("eval.fid_every > 0 on latents needs eval.reference_path (the ADM "
                       "reference batch of the images, e.g. VIRTUAL_imagenet256_labeled.npz)")
  if 0 < training.spike_factor <= 1:
    raise ValueError(f"training.spike_factor={training.spike_factor}: 0 (off) or > 1")


# The configs `validate` accepted, by content (every field's repr, and the registered objectives):
# a run validates its config once at start (main.py), and the library's entry points that guard
# against a bad config themselves (train_state.setup, generation.generate, export) find it here
# instead of checking it, and building its sampling plan, again.
_ACCEPTED = set()


def validate(config) -> None:
  """Raise ValueError naming the first unknown field, invalid value or impossible combination."""
  values = schema.flatten(config)
  key = (repr(sorted(values.items())), tuple(objectives.MODULES))
  if key in _ACCEPTED:
    return
  schema.check_field_names(values)
  for path, rule in all_rules().items():
    if not rule(values[path]):
      raise ValueError(f"{path}={values[path]!r}: must be {rule.text}")
  check(config)
  for registry in REGISTRIES:
    registry.check(config)
  _ACCEPTED.add(key)


def changes(saved, config) -> dict:
  """{field: (saved value, new value)} of the fields that differ between two configs."""
  old, new = schema.flatten(saved), schema.flatten(config)
  return {path: (old.get(path), new.get(path)) for path in sorted(set(old) | set(new))
          if old.get(path) != new.get(path)}


def check_resume(saved, config, *, step: int, allowed=()) -> dict:
  """The changes of a resumed run's config since its checkpoint at `step`, all of them safe
  (RESUMABLE) or named in `allowed`; raises naming every other one with its old and new value."""
  changed = changes(saved, config)
  refused = {path: values for path, values in changed.items()
             if not path.startswith(RESUMABLE) and path not in allowed}
  if refused:
    lines = "; ".join(f"{path}: {old!r} -> {new!r}" for path, (old, new) in refused.items())
    raise ValueError(
        f"the checkpoint at step {step} was trained with another config, and these changes alter "
        f"its saved state or the meaning of the run: {lines}. Resume with the saved values, use a "
        f"new --workdir, or pass --allow_config_change={','.join(refused)} to resume anyway")
  return changed

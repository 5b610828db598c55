"""Config validation (kdiff_jax/config.py): every bad input fails before anything is built, with a
message naming the field and what it allows. Validation is a pure function of the config, so
the table runs in-process in seconds."""
import math
import re

import pytest

from configs import digits_fm, imf_digits, imm_digits, kdiff_digits, meanflow_digits, tvm_digits
from kdiff_jax import config as config_lib, schema

BASES = {"flow": digits_fm.get_config, "kdiff": kdiff_digits.get_config, "imm": imm_digits.get_config,
         "meanflow": meanflow_digits.get_config, "imf": imf_digits.get_config,
         "tvm": tvm_digits.get_config}
NAN, INF = math.nan, math.inf

# (objective, {field: value}, regex of the message). The first group is every bad input of the
# report that used to fail late (after training) or vaguely; the rest cover every section.
CASES = [
    # --- inputs that failed late or vaguely before
    ("flow", {"sampling.guidance_interval": (0.8, 0.2)},
     r"sampling.guidance_interval=\(0.8, 0.2\): must be a pair \(lo, hi\) with lo <= hi"),
    ("flow", {"sampling.guidance_interval": (0.5,)}, r"sampling.guidance_interval=\(0.5,\): must be a pair"),
    ("flow", {"sampling.guidance_interval": (0.0, 0.5, 1.0)}, r"sampling.guidance_interval=.*must be a pair"),
    ("flow", {"sampling.t_start": 0.0, "sampling.t_end": 1.0}, r"sampling.t_start=0.0: must be .*\(0, 1\]"),
    ("flow", {"objective.prediction": "eps"}, r"prediction='eps' gives no x_hat.*sampling.t_start < 1"),
    ("imm", {"sampling.grid": "cifar"}, r"sampling.grid='cifar' has 1- and 2-step grids only, not sampling.num_steps=4"),
    ("flow", {"data.num_classes": 5}, r"data.num_classes=5: data.name='digits' has 10 classes"),
    ("flow", {"data.channels": 3}, r"data.channels=3: data.name='digits' has 1"),
    ("flow", {"eval.fid_every": 10}, r"eval.fid_every=10 needs eval.inception_path"),
    ("flow", {"optimizer.learning_rate": INF}, r"optimizer.learning_rate=inf: must be a finite number > 0"),
    ("flow", {"optimizer.weight_decay": INF}, r"optimizer.weight_decay=inf: must be a finite number >= 0"),
    ("flow", {"model.time_scale": NAN}, r"model.time_scale=nan: must be a finite number > 0"),
    ("flow", {"objective.logit_normal_mean": NAN}, r"objective.logit_normal_mean=nan: must be a finite number"),
    ("flow", {"sampling.guidance_scale": NAN}, r"sampling.guidance_scale=nan: must be a finite number"),
    ("flow", {"training.unknown_field": 1},
     r"unknown config field 'training.unknown_field'.*known fields of 'training': \[.*'training.num_steps'"),
    ("flow", {"optimiser.learning_rate": 0.1},
     r"unknown config field 'optimiser.learning_rate'; did you mean 'optimizer.learning_rate'\?"),
    ("flow", {"sampling.options.etaa": 0.5},
     r"unknown config field 'sampling.options.etaa'; did you mean 'sampling.options.eta'\?"),
    ("flow", {"mesh.rules": (("batch",),)}, r"mesh.rules=\(\('batch',\),\): must be a tuple of \(logical name, mesh axes\)"),
    ("flow", {"training.ema_decays": ("fast",)}, r"training.ema_decays=\('fast',\): must be a tuple of entries, each a finite number in \[0, 1\)"),
    # --- perceptual
    ("flow", {"perceptual.crop_scale": (0.5, 0.1)},
     r"perceptual.crop_scale=\(0.5, 0.1\): must be a pair \(lo, hi\) with lo <= hi"),
    ("flow", {"perceptual.crop_size": 16}, r"perceptual.crop_size=16: must be an int >= 32"),
    # --- data
    ("flow", {"data.name": "mnist"}, r"data.name='mnist': must be one of \['digits', 'synthetic'"),
    ("flow", {"data.image_size": 0}, r"data.image_size=0: must be an int >= 1"),
    ("flow", {"data.num_classes": -1}, r"data.num_classes=-1: must be an int >= 0"),
    ("flow", {"data.num_classes": 0, "sampling.guidance_scale": 2.0},
     r"sampling.guidance_scale=2.0: the network ignores labels \(data.num_classes=0"),
    ("flow", {"data.num_classes": 0, "sampling.guidance_scale": 1.0, "sampling.classes": (1,)},
     r"sampling.classes=\(1,\): data.num_classes=0 is unconditional"),
    ("flow", {"data.name": "tfds"}, r"data.name='tfds' needs data.tfds_name"),
    ("flow", {"data.name": "latents"}, r"data.name='latents' needs data.latents_path"),
    ("flow", {"data.name": "synthetic", "data.latent_channel_std": (0.0,)},
     r"data.latent_channel_std=\(0.0,\): must be a tuple of entries, each a finite number > 0"),
    ("flow", {"data.latent_scale": 0.0}, r"data.latent_scale=0.0: must be a finite number > 0"),
    ("flow", {"data.toy_name": "spiral"}, r"data.toy_name='spiral': must be one of \['8gaussians'"),
    ("flow", {"data.shuffle_buffer": 0}, r"data.shuffle_buffer=0: must be an int >= 1"),
    ("flow", {"data.latent_shard_size": 0}, r"data.latent_shard_size=0: must be an int >= 1"),
    ("flow", {"data.encode_batch_size": -4}, r"data.encode_batch_size=-4: must be an int >= 1"),
    ("flow", {"data.name": "toy2d", "model.name": "mlp"}, r"data.channels=1: data.name='toy2d' has 2"),
    ("flow", {"data.name": "synthetic", "data.latent_channel_mean": (0.0, 1.0)},
     r"data.latent_channel_mean has 2 entries but .*data.channels=1"),
    # --- model
    ("flow", {"model.name": "resnet"}, r"model.name='resnet': must be one of \['dit', 'jit', 'mlp', 'unet'"),
    ("flow", {"model.size": "XXL"}, r"model.size='XXL': must be one of .*'XL'"),
    ("flow", {"model.name": "jit", "model.size": "S"}, r"model.size='S': allowed values for model.name='jit' are \['T', 'XS', 'B', 'L', 'H'\]"),
    ("flow", {"model.patch_size": 16}, r"model.patch_size=16: allowed values for model.name='dit' are \[1, 2, 4, 8\]"),
    ("flow", {"model.patch_size": 0}, r"model.patch_size=0: must be an int >= 1"),
    ("flow", {"data.image_size": 10, "model.patch_size": 4}, r"data.image_size=10 is not a multiple of model.patch_size=4"),
    ("flow", {"model.mlp_ratio": 0.0}, r"model.mlp_ratio=0.0: must be a finite number > 0"),
    ("flow", {"model.time_scale": -1.0}, r"model.time_scale=-1.0: must be a finite number > 0"),
    ("flow", {"model.compute_dtype": "float16"}, r"model.compute_dtype='float16': must be one of \['float32', 'bfloat16'\]"),
    ("flow", {"model.remat": "some"}, r"model.remat='some': must be one of \['none', 'full', 'dots'\]"),
    ("flow", {"model.mlp_width": 0}, r"model.mlp_width=0: must be an int >= 1"),
    ("flow", {"model.mlp_depth": -1}, r"model.mlp_depth=-1: must be an int >= 0"),
    ("flow", {"model.name": "jit", "model.second_time_embedder": True}, r"model.name='jit' has no second time embedder"),
    ("flow", {"model.name": "mlp"}, r"model.name='mlp' takes flat points: data.name must be 'toy2d'"),
    ("flow", {"data.name": "toy2d", "data.channels": 2}, r"model.name='dit' takes images; data.name='toy2d' has flat points"),
    # --- objective (all three)
    ("flow", {"objective.name": "ddpm"}, r"objective.name='ddpm': must be one of \['flow', 'imm', 'kdiff', "),
    ("flow", {"objective.schedule": "edm"}, r"objective.schedule='edm': must be one of \['rectified_flow', 'cosine', 'vp'\]"),
    ("flow", {"objective.prediction": "u_k"}, r"objective.prediction='u_k': must be one of \['eps', 'x', 'v', 'velocity', 'score'\]"),
    ("flow", {"objective.loss_target": "noise"}, r"objective.loss_target='noise': must be one of"),
    ("flow", {"objective.time_sampling": "beta"}, r"objective.time_sampling='beta': must be one of \['uniform', 'logit_normal'\]"),
    ("flow", {"objective.logit_normal_std": 0.0}, r"objective.logit_normal_std=0.0: must be a finite number > 0"),
    ("flow", {"objective.t_min": 1.0}, r"objective.t_min=1.0: must be a finite number in \[0, 1\)"),
    ("flow", {"objective.t_max": 0.0}, r"objective.t_max=0.0: must be a finite number in \(0, 1\]"),
    ("flow", {"objective.t_min": 0.5, "objective.t_max": 0.4}, r"objective.t_min=0.5 must be < objective.t_max=0.4"),
    ("flow", {"objective.noise_std": 0.0}, r"objective.noise_std=0.0: must be a finite number > 0"),
    ("flow", {"objective.label_dropout": 1.0}, r"objective.label_dropout=1.0: must be a finite number in \[0, 1\)"),
    ("flow", {"objective.min_divisor": -0.1}, r"objective.min_divisor=-0.1: must be a finite number >= 0"),
    ("imm", {"objective.imm.group_size": 0}, r"objective.imm.group_size=0: must be an int >= 1"),
    ("imm", {"objective.imm.k": -1}, r"objective.imm.k=-1: must be an int >= 0"),
    ("imm", {"objective.imm.delta": 1.0}, r"objective.imm.delta=1.0: must be a finite number in \[0, 1\)"),
    ("imm", {"objective.imm.f_type": "edm"}, r"objective.imm.f_type='edm': must be one of \['euler_fm', 'simple_edm', 'identity'\]"),
    ("imm", {"objective.imm.kernel": "gauss"}, r"objective.imm.kernel='gauss': must be one of \['laplace', 'rbf'\]"),
    ("imm", {"objective.imm.bandwidth": 0.0}, r"objective.imm.bandwidth=0.0: must be a finite number > 0"),
    ("imm", {"objective.imm.estimator": "w"}, r"objective.imm.estimator='w': must be one of \['v', 'u'\]"),
    ("imm", {"objective.imm.a": -1.0}, r"objective.imm.a=-1.0: must be a finite number >= 0"),
    ("imm", {"objective.imm.b": NAN}, r"objective.imm.b=nan: must be a finite number"),
    ("imm", {"objective.imm.time_conditioning": "both"}, r"objective.imm.time_conditioning='both': must be one of \['identity', 'stride'\]"),
    ("imm", {"model.second_time_embedder": False}, r"objective.name='imm' conditions the network on t and on s.*second_time_embedder=True"),
    ("imm", {"objective.imm.estimator": "u", "objective.imm.group_size": 1}, r"objective.imm.group_size=1 must be >= 2"),
    ("imm", {"objective.t_max": 1.0, "sampling.t_start": 1.0}, r"objective.t_max=1.0: IMM needs a finite eta\(T\)"),
    ("kdiff", {"objective.kdiff.k_init": 1.0}, r"objective.kdiff.k_init=1.0: must be in \(0, 1\) when objective.kdiff.learnable"),
    ("kdiff", {"objective.kdiff.k_init": 1.5}, r"objective.kdiff.k_init=1.5: must be a finite number in \[0, 1\]"),
    ("kdiff", {"objective.kdiff.w_k_scale": 0.0}, r"objective.kdiff.w_k_scale=0.0: must be a finite number > 0"),
    ("kdiff", {"objective.kdiff.learnable": False, "objective.kdiff.time_dependent": True}, r"objective.kdiff.time_dependent=True needs objective.kdiff.learnable=True"),
    # --- optimizer
    ("flow", {"optimizer.learning_rate": -1e-4}, r"optimizer.learning_rate=-0.0001: must be a finite number > 0"),
    ("flow", {"optimizer.lr_schedule": "linear"}, r"optimizer.lr_schedule='linear': must be one of \['constant', 'cosine'\]"),
    ("flow", {"optimizer.warmup_steps": -1}, r"optimizer.warmup_steps=-1: must be an int >= 0"),
    ("flow", {"optimizer.b1": 1.0}, r"optimizer.b1=1.0: must be a finite number in \[0, 1\)"),
    ("kdiff", {"optimizer.b2": -0.1}, r"optimizer.b2=-0.1: must be a finite number in \[0, 1\)"),
    ("imm", {"optimizer.eps": 0.0}, r"optimizer.eps=0.0: must be a finite number > 0"),
    ("flow", {"optimizer.grad_clip_norm": -1.0}, r"optimizer.grad_clip_norm=-1.0: must be a finite number >= 0 \(0 = off\)"),
    # --- training
    ("flow", {"training.batch_size": 0}, r"training.batch_size=0: must be an int >= 1"),
    ("kdiff", {"training.num_steps": -1}, r"training.num_steps=-1: must be an int >= 0"),
    ("flow", {"training.ema_decays": (1.0,)}, r"training.ema_decays=\(1.0,\): must be a tuple of entries, each a finite number in \[0, 1\)"),
    ("flow", {"training.ema_decays": (0.9, 0.9)}, r"training.ema_decays=\(0.9, 0.9\): each decay once"),
    ("flow", {"training.log_every": 0}, r"training.log_every=0: must be an int >= 1"),
    ("imm", {"training.sample_every": -1}, r"training.sample_every=-1: must be an int >= 0"),
    ("flow", {"training.checkpoint_every": 0}, r"training.checkpoint_every=0: must be an int >= 1"),
    ("flow", {"training.on_nonfinite": "retry"}, r"training.on_nonfinite='retry': must be one of \['stop', 'rollback_skip'\]"),
    ("flow", {"training.max_rollbacks": -1}, r"training.max_rollbacks=-1: must be an int >= 0"),
    ("flow", {"training.spike_factor": 0.5}, r"training.spike_factor=0.5: 0 \(off\) or > 1"),
    ("flow", {"training.per_step_metrics": (3,)}, r"training.per_step_metrics=\(3,\): must be a tuple of entries, each a string"),
    # --- sampling
    ("flow", {"sampling.method": "nope"}, r"sampling.method='nope': objective.name='flow' samples with one of \['euler'"),
    ("meanflow", {"sampling.method": "heun"}, r"sampling.method='heun': objective.name='meanflow' samples with one of \['mean_flow'\]"),
    ("imf", {"sampling.guidance_scale": 9.0}, r"sampling.guidance_scale=9.0: the network was trained on omega in \[1, 1 \+ objective.imf.s_max\] = \[1, 8.0\]"),
    ("tvm", {"sampling.guidance_interval": (0.2, 1.0)}, r"sampling.guidance_interval=\(0.2, 1.0\): TVM's guidance is trained into every step"),
    ("imf", {"objective.imf.interval_split": 0.0}, r"objective.imf.interval_split=0.0: must be a finite number in \(0, 1\)"),
    ("tvm", {"objective.tvm.cfg_draw": "normal"}, r"objective.tvm.cfg_draw='normal': must be one of \['fixed', 'range', 'uniform'\]"),
    ("meanflow", {"objective.meanflow.kappa": 1.0}, r"objective.meanflow.kappa=1.0: must be a finite number in \[0, 1\)"),
    ("imm", {"sampling.method": "heun"}, r"sampling.method='heun': objective.name='imm' samples with one of \['pushforward', 'restart'\]"),
    ("flow", {"sampling.method": "pushforward"}, r"sampling.method='pushforward': objective.name='flow' samples with one of \['euler'"),
    ("kdiff", {"sampling.method": "restart"}, r"sampling.method='restart': objective.name='kdiff' samples with one of"),
    ("flow", {"sampling.num_steps": 0}, r"sampling.num_steps=0: must be an int >= 1"),
    ("flow", {"sampling.grid": "linear"}, r"sampling.grid='linear': must be one of \['uniform_t', 'karras'"),
    ("flow", {"sampling.t_end": 1.0}, r"sampling.t_end=1.0: must be a finite number in \[0, 1\)"),
    ("flow", {"sampling.t_start": 0.5, "sampling.t_end": 0.5}, r"sampling.t_start=0.5, sampling.t_end=0.5: .*t_end < t_start"),
    ("flow", {"sampling.options.eta": 2.0}, r"sampling.options.eta=2.0: must be a finite number in \[0, 1\]"),
    ("flow", {"sampling.options.eta": 0.5}, r"sampling.options.eta=0.5 has no effect with sampling.method='heun'.*\['ddim'\]"),
    ("imm", {"sampling.options.eta": 0.5}, r"sampling.options.eta=0.5 has no effect with sampling.method='pushforward'"),
    ("flow", {"sampling.options.rho": 5.0}, r"sampling.options.rho=5.0 has no effect.*grid karras"),
    ("flow", {"sampling.options.S_churn": -1.0}, r"sampling.options.S_churn=-1.0: must be a finite number >= 0"),
    ("flow", {"sampling.options.midpoint": "x"}, r"sampling.options.midpoint='x': must be one of \['t', 'eta'\]"),
    ("flow", {"sampling.options.variant": "bh3"}, r"sampling.options.variant='bh3': must be one of \['bh1', 'bh2'\]"),
    ("flow", {"sampling.options.shift": 0.0}, r"sampling.options.shift=0.0: must be a finite number > 0"),
    ("flow", {"sampling.options.S_tmax": NAN}, r"sampling.options.S_tmax=nan: must be a number \(inf allowed\) > 0"),
    ("kdiff", {"sampling.guidance_scale": INF}, r"sampling.guidance_scale=inf: must be a finite number"),
    ("flow", {"sampling.grid_size": 0}, r"sampling.grid_size=0: must be an int >= 1"),
    ("flow", {"sampling.num_samples": 0}, r"sampling.num_samples=0: must be an int >= 1"),
    ("flow", {"sampling.classes": (3, 12)}, r"sampling.classes=\(3, 12\): each must be in \[0, data.num_classes=10\)"),
    ("flow", {"sampling.classes": (-1,)}, r"sampling.classes=\(-1,\): must be a tuple of entries, each an int >= 0"),
    ("flow", {"sampling.seed": -1}, r"sampling.seed=-1: must be an int >= 0"),
    ("flow", {"sampling.method": "f_pndm"}, r"sampling.method='f_pndm' is eps-driven.*t_start < 1"),
    # --- mesh, eval, checkpoint, export, seed
    ("flow", {"mesh.data": 0}, r"mesh.data/fsdp/tensor=.*each must be a positive size, at most one -1"),
    ("flow", {"mesh.fsdp": -1}, r"mesh.data/fsdp/tensor=.*at most one -1"),
    ("flow", {"mesh.gather_weights": "sometimes"},
     r"mesh.gather_weights='sometimes': must be one of \['once', 'per_call'\]"),
    ("flow", {"mesh.tensor": -2}, r"mesh.tensor=-2: must be an int >= -1"),
    ("flow", {"mesh.rules": (("embed", "model"),)}, r"mesh.rules=.*the axes None, one of \['data', 'fsdp', 'tensor'\]"),
    ("flow", {"eval.fid_every": -1}, r"eval.fid_every=-1: must be an int >= 0"),
    ("flow", {"eval.fid_num_samples": 1}, r"eval.fid_num_samples=1: must be an int >= 2"),
    ("flow", {"eval.num_samples": 0}, r"eval.num_samples=0: must be an int >= 2"),
    ("flow", {"eval.batch_size": 0}, r"eval.batch_size=0: must be an int >= 1"),
    ("flow", {"eval.reference_num_examples": 1}, r"eval.reference_num_examples=1: must be an int >= 2"),
    ("flow", {"data.name": "latents", "data.latents_path": "/l", "data.vae_path": "/v",
              "eval.fid_every": 5, "eval.inception_path": "/i"}, r"eval.fid_every > 0 on latents needs eval.reference_path"),
    ("flow", {"checkpoint.max_to_keep": 0}, r"checkpoint.max_to_keep=0: must be an int >= 1"),
    ("flow", {"seed": -1}, r"seed=-1: must be an int >= 0"),
]


def _config(objective, fields):
  config = BASES[objective]()
  with config.unlocked():
    for path, value in fields.items():
      *sections, name = path.split(".")
      node = config
      for section in sections:
        if section not in node:
          node[section] = type(config)()
        node = node[section]
      node[name] = value
  return config


def test_the_table_covers_every_section_and_objective():
  """Every section of the schema with a field that a value of its own type can break (all but
  free strings and booleans, which a config file cannot set to another type) has a bad input in
  the table, and every demo objective is a base of some case; the sections come from the rules,
  so a new section without a case fails here."""
  breakable = {path.split(".")[0] for path, rule in config_lib.all_rules().items()
               if rule.text not in (schema.boolean().text, schema.text().text)}
  covered = {path.split(".")[0] for _, fields, _ in CASES for path in fields}
  assert breakable <= covered, sorted(breakable - covered)
  assert {objective for objective, _, _ in CASES} == set(BASES)


@pytest.mark.parametrize("objective", sorted(BASES))
def test_the_demo_configs_are_valid(objective):
  config_lib.validate(BASES[objective]())


@pytest.mark.parametrize("objective, fields, message", CASES,
                         ids=[f"{o}:{','.join(f)}" for o, f, _ in CASES])
def test_bad_input_fails_before_anything_is_built(objective, fields, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate(_config(objective, fields))


def test_every_field_has_a_rule():
  assert set(schema.flatten(schema.defaults())) == set(config_lib.all_rules())


def test_resume_refuses_what_alters_the_run_and_allows_the_rest():
  saved = digits_fm.get_config()
  safe = {"training.num_steps": 5000, "optimizer.learning_rate": 3e-4, "training.log_every": 7,
          "training.checkpoint_every": 11, "training.sample_every": 13, "sampling.num_steps": 4,
          "eval.fid_num_samples": 5000, "mesh.data": 2, "optimizer.warmup_steps": 0,
          "optimizer.lr_schedule": "constant", "model.attention": "cudnn", "model.remat": "full"}
  for path, value in safe.items():
    changed = config_lib.check_resume(saved, _config("flow", {path: value}), step=1000)
    assert path in changed and changed[path][1] == value
  refused = {"data.image_size": 16, "objective.schedule": "cosine", "objective.prediction": "x",
             "training.batch_size": 64, "data.name": "synthetic", "seed": 1,
             "model.compute_dtype": "bfloat16", "model.size": "XS", "training.ema_decays": (0.99,),
             "optimizer.b1": 0.8, "optimizer.grad_clip_norm": 1.0, "objective.name": "kdiff"}
  for path, value in refused.items():
    new = _config("flow", {path: value})
    with pytest.raises(ValueError, match=rf"the checkpoint at step 1000 was trained with another "
                                         rf"config.*{path}: .* -> {re.escape(repr(value))}.*"
                                         rf"--allow_config_change={path}"):
      config_lib.check_resume(saved, new, step=1000)
    assert path in config_lib.check_resume(saved, new, step=1000, allowed=(path,))


def test_a_config_is_checked_once_and_again_when_it_changes(monkeypatch):
  """validate remembers what it accepted: the library's own guards after main.py's validation
  (train_state.setup, generation, export) do not check, nor build the sampling plan, again."""
  from kdiff_jax import sampling
  calls = []
  check = sampling.check
  monkeypatch.setattr(sampling, "check", lambda config: calls.append(1) or check(config))
  config = digits_fm.get_config()
  config.sampling.num_steps = 7   # a config no other test validated
  config_lib.validate(config)
  config_lib.validate(config)
  assert len(calls) == 1
  config.sampling.num_steps = 9
  config_lib.validate(config)
  assert len(calls) == 2
  config.sampling.num_steps = 0
  with pytest.raises(ValueError, match="sampling.num_steps=0"):
    config_lib.validate(config)
  with pytest.raises(ValueError, match="sampling.num_steps=0"):
    config_lib.validate(config)   # a refused config is refused every time

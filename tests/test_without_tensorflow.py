"""A GPU or TPU box without TensorFlow (nor TFDS or clu) trains, checkpoints, writes TensorBoard
events and samples: TF-backed pieces load only when a run reads TFDS."""
import os
import subprocess
import sys

from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import importlib.machinery, sys
ABSENT = ('tensorflow', 'tensorflow_datasets', 'clu')

class Uninstalled(importlib.machinery.PathFinder):   # as if not installed: find_spec gives None
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    return None if name.split('.')[0] in ABSENT else super().find_spec(name, path, target)

sys.meta_path = [Uninstalled if f is importlib.machinery.PathFinder else f for f in sys.meta_path]

import glob, os
from configs import default
from kdiff_jax import train

config = default.get_config()
config.data.name, config.data.image_size, config.data.channels = 'synthetic', 8, 2
config.data.num_classes = 4
config.model.size, config.model.patch_size = 'T', 2
config.training.batch_size, config.training.num_steps = 8, 3
config.training.log_every = config.training.checkpoint_every = config.training.sample_every = 3
config.sampling.num_steps, config.sampling.grid_size = 2, 2
config.checkpoint.async_save = False
workdir = sys.argv[1]
state = train.train_and_evaluate(config, workdir)
assert int(state['step']) == 3
assert glob.glob(os.path.join(workdir, '**', 'events.out.tfevents.*'), recursive=True)
assert glob.glob(os.path.join(workdir, 'samples', '*.png'))
assert not [m for m in sys.modules if m.split('.')[0] in ABSENT]
print('ok')
"""


def test_training_runs_with_tensorflow_tfds_and_clu_unimportable(tmp_path):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]

"""Several hosts, simulated by local processes: 2 processes x 4 CPU devices (gloo collectives on
127.0.0.1) train exactly like 1 process x 8 devices, survive SIGKILL and SIGTERM, and their
checkpoints restore on other topologies.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import digits_fm
from kdiff_jax import checkpoint, train
from tests.conftest import xla_flags

# pytest-xdist runs the tests that share this module's fixtures on one worker.
pytestmark = pytest.mark.xdist_group("multihost")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS, CHECKPOINT_EVERY = 12, 4
OVERRIDES = {
    "model.size": "T", "training.batch_size": 64, "training.num_steps": NUM_STEPS,
    "training.checkpoint_every": CHECKPOINT_EVERY, "training.log_every": 1,
    "training.sample_every": 0, "sampling.num_steps": 2, "sampling.grid_size": 2,
}


def config():
  c = digits_fm.get_config()
  for path, value in OVERRIDES.items():
    section, field = path.split(".")
    c[section][field] = value
  return c


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir, num_processes):
  """Start main.py as num_processes processes sharing 8 CPU devices; return the Popen list."""
  args = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  port = free_port()
  procs = []
  for i in range(num_processes):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(8 // num_processes))
    cmd = [sys.executable, "main.py", "--config=configs/digits_fm.py", f"--workdir={workdir}", *args]
    if num_processes > 1:
      cmd += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
              f"--process_id={i}"]
    log = open(os.path.join(workdir, f"log{i}.txt"), "a")
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def wait(procs, timeout=150):
  deadline = time.time() + timeout
  for p in procs:
    assert p.wait(timeout=max(1, deadline - time.time())) == 0


def run(workdir, num_processes):
  os.makedirs(workdir, exist_ok=True)
  wait(launch(workdir, num_processes))


def interrupt(workdir, num_processes, sig):
  """Start a run, send `sig` to every process once the first checkpoint is complete."""
  os.makedirs(workdir, exist_ok=True)
  procs = launch(workdir, num_processes)
  first = os.path.join(workdir, "checkpoints", str(CHECKPOINT_EVERY))
  deadline = time.time() + 150
  while not os.path.isdir(first):
    assert time.time() < deadline and all(p.poll() is None for p in procs), "no checkpoint written"
    time.sleep(0.01)
  for p in procs:
    p.send_signal(sig)
  return [p.wait(timeout=120) for p in procs]


def losses(workdir):
  import tensorflow as tf
  out = {}
  for name in os.listdir(workdir):
    if name.startswith("events.out.tfevents"):
      for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
        for value in event.summary.value:
          if value.tag == "loss":
            out[event.step] = float(tf.make_ndarray(value.tensor))
  return np.array([out[step] for step in sorted(out)])


def final_state(workdir, devices=None, **mesh):
  c = config()
  for axis, size in mesh.items():
    c.mesh[axis] = size
  setup = train.setup(c, devices)
  mngr = checkpoint.manager(workdir, c.checkpoint)
  state, _ = checkpoint.restore(mngr, setup.abstract_state)
  mngr.close()
  return jax.device_get(state)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  start = time.time()
  for name in ("one", "two"):
    os.makedirs(root / name)
  wait(launch(str(root / "one"), 1) + launch(str(root / "two"), 2))  # side by side: startup overlaps
  print(f"1x8 and 2x4 runs: {time.time() - start:.0f} s")
  return root


def test_two_processes_train_like_one(runs):
  one, two = losses(str(runs / "one")), losses(str(runs / "two"))
  assert len(one) == len(two) == NUM_STEPS
  print(f"max |loss 2x4 - loss 1x8| = {np.max(np.abs(one - two)):.2e}")
  np.testing.assert_allclose(two, one, rtol=1e-5)
  a, b = final_state(str(runs / "one")), final_state(str(runs / "two"))
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("devices, mesh", [(1, dict(data=1, fsdp=1)), (8, dict(data=2, fsdp=4)),
                                            (8, dict(data=1, fsdp=8))])
def test_two_process_checkpoint_restores_on_other_topologies(runs, devices, mesh):
  two = final_state(str(runs / "two"))  # default mesh: data = all 8 devices
  other = final_state(str(runs / "two"), jax.devices()[:devices], **mesh)
  for x, y in zip(jax.tree.leaves(two), jax.tree.leaves(other)):
    np.testing.assert_array_equal(x, y)


def test_sigkill_then_restart_finishes_like_an_uninterrupted_run(runs):
  workdir = str(runs / "killed")
  interrupt(workdir, 2, signal.SIGKILL)
  mngr = checkpoint.manager(workdir, config().checkpoint)
  resumed_from = mngr.latest_step()
  mngr.close()
  assert resumed_from is not None and resumed_from < NUM_STEPS, "the kill came too late"
  run(workdir, 2)
  a, b = final_state(str(runs / "two")), final_state(workdir)
  assert int(b["step"]) == NUM_STEPS
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_sigterm_checkpoints_and_exits_cleanly(runs):
  workdir = str(runs / "preempted")
  assert interrupt(workdir, 1, signal.SIGTERM) == [0]
  mngr = checkpoint.manager(workdir, config().checkpoint)
  saved = mngr.latest_step()
  mngr.close()
  with open(os.path.join(workdir, "log0.txt")) as f:
    assert f"preempted: saved step {saved}" in f.read()
  run(workdir, 1)
  a, b = final_state(str(runs / "one")), final_state(workdir)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)

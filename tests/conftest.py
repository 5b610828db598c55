"""Test setup: 8 simulated CPU devices, float32 matmuls, quiet TensorFlow, a per-run XLA cache.

XLA_FLAGS must be set before jax is imported anywhere, hence here. Most of the suite's time is
XLA compiling tiny programs that then run once, so the tests compile without LLVM's optimisation
passes (--xla_backend_optimization_level=0: the same operations in the same precision, generated
less cleverly; it halves tests/test_dit.py's CPU time). The demo runs (`train_demo`, 1500 steps)
and the multi-process runs set their own XLA_FLAGS and compile as users do.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _compilation_cache() -> str:
  """One XLA compilation cache per test run, shared by the xdist workers and every subprocess
  they start: a program that another test (or a restarted run) already compiled is loaded, not
  compiled again. A fresh directory each run, so nothing carries over between runs."""
  import tempfile
  run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  if run_id is None:
    return tempfile.mkdtemp(prefix="kdiff_jax_xla_cache_")
  return os.path.join(tempfile.gettempdir(), f"kdiff_jax_xla_cache_{run_id}")


os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _compilation_cache())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# torchvision 0.28.0, the registry's only build, fails registering its `torchvision::nms` meta
# kernel against our torch; lpips, transformers and (through transformers) diffusers import it.
# An empty torchvision._meta_registrations lets it import (no test uses nms).
import sys  # noqa: E402
import types  # noqa: E402

sys.modules.setdefault("torchvision._meta_registrations",
                       types.ModuleType("torchvision._meta_registrations"))

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_default_matmul_precision", "float32")

import pytest  # noqa: E402


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a short subprocess run (a few steps) on `devices` CPU devices: compiled
  without LLVM's optimisation passes, as the suite's own programs (module docstring)."""
  return f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"


def train_demo(name: str, workdir: str):
  """`python main.py --config=configs/<name>.py --workdir=<workdir>` as a user runs it on a CPU
  (one device); what it printed goes to workdir/console.txt. Returns (config, workdir)."""
  import importlib
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run([sys.executable, "main.py", f"--config=configs/{name}.py",
                           f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
  with open(os.path.join(workdir, "console.txt"), "w") as f:
    f.write(result.stdout + result.stderr)
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  return importlib.import_module(f"configs.{name}").get_config(), workdir


def once_per_run(tmp_path_factory, name: str, make):
  """make(directory) run once per test run, also when pytest-xdist splits the run over workers
  (the first worker makes it under a file lock, the others wait and reuse it); the directory."""
  run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  if run_id is None:
    directory = str(tmp_path_factory.mktemp(name))
    make(directory)
    return directory
  from filelock import FileLock
  directory = os.path.join(str(tmp_path_factory.getbasetemp().parent), f"{run_id}_{name}")
  with FileLock(directory + ".lock"):
    if not os.path.exists(os.path.join(directory, ".done")):
      os.makedirs(directory, exist_ok=True)
      make(directory)
      open(os.path.join(directory, ".done"), "w").close()
  return directory


@pytest.fixture(scope="session")
def digits_fm_run(tmp_path_factory):
  """The README demo command (main.py on configs/digits_fm.py), run once per test run."""
  directory = once_per_run(tmp_path_factory, "digits_fm", lambda d: train_demo("digits_fm", d))
  from configs import digits_fm
  return digits_fm.get_config(), directory


def pytest_sessionfinish(session):
  """Free the compiled programs and arrays the run made while the worker is still in its session.

  Left to interpreter exit, that garbage collection can outlast the 5 s pytest-xdist gives a
  finished worker to shut down; it then sends the worker SIGINT, which lands in JAX's gc
  callback and prints a KeyboardInterrupt traceback after a run that passed."""
  del session
  import gc
  jax.clear_caches()
  gc.collect()

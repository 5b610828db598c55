"""main.py answers a mistake in one line ("error: ..."), exit code 2, no traceback, and creates
nothing it was not asked to."""
import os
import subprocess
import sys

import pytest

from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, cwd=ROOT, devices=1):
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices))
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--config=configs/nope.py", "--workdir={tmp}/w"], r"--config=configs/nope.py: no such file"),
    (["--config=configs", "--workdir={tmp}/w"], r"--config=configs: configs is a directory"),
    (["--config=configs/digits_fm.py", "--workdir={tmp}/w", "--config.optimiser.learning_rate=0.1"],
     r"unknown config field 'optimiser.learning_rate'; did you mean 'optimizer.learning_rate'\?"),
    (["--config=configs/digits_fm.py", "--workdir={tmp}/w", "--config.training.unknown_field=1"],
     r"unknown config field 'training.unknown_field' \(known fields of 'training'"),
    (["--config=configs/digits_fm.py", "--workdir={tmp}/w", "--config.sampling.options.etaa=0.5"],
     r"did you mean 'sampling.options.eta'\?"),
    (["--config=configs/digits_fm.py", "--workdir="], r"--workdir is empty"),
    (["--config=configs/digits_fm.py", "--workdir={tmp}/file"], r"--workdir=.*/file is a file"),
    (["--config=configs/digits_fm.py", "--workdir=/proc/kdiff_jax_run"],
     r"--workdir=/proc/kdiff_jax_run is not writable"),
    (["--config=configs/digits_fm.py", "--workdir={tmp}/w", "--config.sampling.method=pushforward"],
     r"sampling.method='pushforward': objective.name='flow' samples with one of"),
    (["--workdir={tmp}/missing", "--mode=sample"], r"--workdir=.*/missing: no checkpoint"),
    (["--config=configs/digits_fm.py", "--workdir={tmp}/missing", "--mode=eval"],
     r"--workdir=.*/missing does not exist"),
], ids=["config-missing", "config-directory", "unknown-section", "unknown-field", "unknown-option",
        "workdir-empty", "workdir-file", "workdir-read-only", "sampler-objective",
        "sample-no-config-no-run", "eval-no-run"])
def test_mistakes_answer_in_one_line(tmp_path, args, message):
  (tmp_path / "file").write_text("")
  result = run_main(*(arg.format(tmp=tmp_path) for arg in args))
  assert result.returncode == 2, result.stdout + result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  import re
  assert re.search(message, lines[0]), lines[0]
  assert not (tmp_path / "w").exists() and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("args, message", [
    (["--config=configs/digits_fm.py", "--config.training.batch_size=6"],
     r"training.batch_size=6 must be divisible by the 4 batch shards"),
    (["--config=configs/digits_fm.py", "--config.mesh.data=3"],
     r"mesh.data\*fsdp\*tensor=.*must equal the 4 devices"),
    (["--config=configs/imm_digits.py", "--config.objective.imm.group_size=3",
      "--config.training.batch_size=8"],
     r"training.batch_size=8 gives 2 examples per device, not a multiple of the objective's "
     r"group size 3"),
], ids=["batch-over-devices", "mesh-data", "imm-group"])
def test_mistakes_found_at_mesh_time_leave_no_workdir(tmp_path, args, message):
  """On 4 devices: found after the workdir was prepared, before anything is written; the
  workdir this run created (two levels of it) is removed again; in a workdir that existed,
  only the log this run created goes."""
  import re
  (tmp_path / "existing").mkdir()
  workdirs = [tmp_path / "new" / "run"] + ([tmp_path / "existing"] if "shards" in message else [])
  for workdir in workdirs:
    result = run_main(*args, f"--workdir={workdir}", devices=4)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stdout + result.stderr
    assert re.search(message, lines[0]), lines[0]
  assert sorted(os.listdir(tmp_path)) == ["existing"]
  assert os.listdir(tmp_path / "existing") == []


def test_verbosity_shows_the_traceback(tmp_path):
  result = run_main("--config=configs/digits_fm.py", f"--workdir={tmp_path}/w",
                    "--config.sampling.method=pushforward", "--verbosity=1")
  assert result.returncode != 0 and "Traceback" in result.stderr

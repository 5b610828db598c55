"""The run's console: a few short lines from process 0, library chatter off unless asked for.

  console.quiet_libraries(verbose=False)   # Orbax / absl / JAX / TensorFlow INFO lines off
  console.info("step %d  loss %.4f", step, loss)
  console.each("wrote %s", path)           # from every process, prefixed with its index

`info` prints "HH:MM:SS message" to stdout on process 0 only, through its own logger (not absl's
root handler), so it shows whatever the libraries' verbosity. main.py calls quiet_libraries
unless --verbosity >= 1, and then `divert_library_output(log_path(workdir))`: from there on
whatever goes to the process's stderr (absl / Orbax / JAX logs, the tracebacks that Orbax's and
asyncio's background threads print, Python warnings) lands in <workdir>/log.txt, and `error`
writes the run's last line to the terminal's stderr.
"""
import logging
import os
import sys
import tempfile

import jax


class _Stdout(logging.StreamHandler):
  """A handler writing to sys.stdout as it is at each line (pytest's capture, redirect_stdout)."""

  @property
  def stream(self):
    return sys.stdout

  @stream.setter
  def stream(self, value):
    del value


_LOGGER = logging.getLogger("kdiff_jax.console")
if not _LOGGER.handlers:
  _handler = _Stdout()
  _handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
  _LOGGER.addHandler(_handler)
  _LOGGER.setLevel(logging.INFO)
  _LOGGER.propagate = False


def info(message: str, *args) -> None:
  """One console line, from process 0 only."""
  if jax.process_index() == 0:
    _LOGGER.info(message, *args)


_TERMINAL_STDERR = None   # the console's stderr while the process's stderr goes to a log file


def error(message: str) -> None:
  """The run's one-line error, on the console's stderr (also while library output is diverted)."""
  stream = _TERMINAL_STDERR or sys.stderr
  print(message, file=stream, flush=True)


def log_path(workdir: str) -> str:
  """<workdir>/log.txt on process 0, log.process<i>.txt on the others; for a workdir that is not
  a local path (gs://), a file of that name in the temporary directory."""
  name = "log.txt" if jax.process_index() == 0 else f"log.process{jax.process_index()}.txt"
  if "://" in workdir:
    return os.path.join(tempfile.gettempdir(), f"kdiff_jax_{os.getpid()}_{name}")
  return os.path.join(workdir, name)


def divert_library_output(path: str) -> None:
  """Send everything written to this process's stderr from now on to the file `path` (appended).

  It redirects file descriptor 2 itself, so it catches what libraries print from C++ and from
  threads that outlive the run too. `error` still reaches the console.
  """
  global _TERMINAL_STDERR
  sys.stderr.flush()
  if _TERMINAL_STDERR is None:
    _TERMINAL_STDERR = os.fdopen(os.dup(2), "w", buffering=1)
  log = open(path, "a", buffering=1)  # noqa: SIM115 -- open until the process exits
  os.dup2(log.fileno(), 2)


def each(message: str, *args) -> None:
  """One console line from every process, prefixed with its index (per-process work)."""
  _LOGGER.info("process %d: " + message, jax.process_index(), *args)


def quiet_libraries(verbose: bool = False) -> None:
  """Warnings and errors only from absl, Orbax, JAX and TensorFlow (all of it when verbose)."""
  from absl import logging as absl_logging
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")
  level = logging.INFO if verbose else logging.WARNING
  absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
  for name in ("absl", "jax", "orbax", "tensorflow"):
    logging.getLogger(name).setLevel(level)


def size(num_bytes: float) -> str:
  """12.3 KiB / 4.5 MiB / 6.7 GiB."""
  for unit in ("B", "KiB", "MiB", "GiB"):
    if num_bytes < 1024 or unit == "GiB":
      return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
    num_bytes /= 1024


def duration(seconds: float) -> str:
  """1h02m03s / 4m05s / 6.7s."""
  if seconds < 60:
    return f"{seconds:.1f}s"
  minutes, seconds = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"

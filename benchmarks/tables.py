"""Markdown tables as a benchmark makes them (benchmarks/step_time.py, torch_step_time.py)."""
import contextlib


@contextlib.contextmanager
def table_writer(path: str, lines):
  """emit(line): prints it and, with a path, appends it to that file at once, so a sweep stopped
  midway keeps the rows it made. The preamble `lines` (header and rule included) go first."""
  output = open(path, "w") if path else None

  def emit(line):
    print(line, flush=True)
    if output:
      output.write(line + "\n")
      output.flush()

  try:
    for line in lines:
      emit(line)
    yield emit
  finally:
    if output:
      output.close()

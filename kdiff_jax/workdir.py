"""The run's directory as main.py prepares it: checked for the mode, created when the mode writes
there, its log of the libraries' output, and what a mistake created removed again.

  workdir = Workdir.prepare("/tmp/run", mode="train")   # ValueError: a file, missing, read-only
  workdir.divert_library_output()                        # stderr -> /tmp/run/log.txt
  workdir.undo()                                         # after a mistake: remove what it created
"""
import os
import shutil

from etils import epath

from kdiff_jax import console

READING = ("sample", "eval", "export")   # modes that read a trained run
WRITING = ("train", "import")            # modes that write a run


class Workdir:
  """--workdir for one mode; `created` is the topmost directory this run made (or None)."""

  def __init__(self, path: str, created=None):
    self.path, self.created, self.new_files = path, created, []

  @classmethod
  def prepare(cls, path: str, mode: str) -> "Workdir":
    """A writing mode can create and write `path`; a reading mode finds it; encode_latents
    writes elsewhere (data.latents_path) and needs nothing."""
    directory = epath.Path(path)
    if directory.exists() and not directory.is_dir():
      raise ValueError(f"--workdir={path} is a file, not a directory")
    if mode in READING and not directory.is_dir():
      raise ValueError(f"--workdir={path} does not exist: train there first (--mode=train)")
    if mode not in WRITING:
      return cls(path)
    created = None   # the topmost directory that does not exist yet
    if not directory.exists():
      created = directory
      while not created.parent.exists():
        created = created.parent
    try:
      directory.mkdir(parents=True, exist_ok=True)
      probe = directory / f".write_probe_{os.getpid()}"
      probe.write_text("")
      probe.unlink()
    except OSError as error:
      raise ValueError(f"--workdir={path} is not writable ({error.strerror or error}): choose "
                       "another directory or fix its permissions") from error
    return cls(path, created)

  def divert_library_output(self) -> None:
    """The libraries' stderr from now on into log.txt here (console.divert_library_output)."""
    log = console.log_path(self.path)
    if not os.path.exists(log):
      self.new_files.append(log)
    console.divert_library_output(log)

  def undo(self) -> None:
    """After a mistake: remove the directory this run created when it holds only files this run
    created (its log), else just those files."""
    new = {os.path.abspath(path) for path in self.new_files}
    if self.created is not None and os.path.isdir(self.created):
      if all(os.path.abspath(os.path.join(directory, file)) in new
             for directory, _, files in os.walk(self.created) for file in files):
        shutil.rmtree(self.created, ignore_errors=True)
        return
    for path in new:
      if os.path.isfile(path):
        os.remove(path)

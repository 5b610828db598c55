"""EDM's pickle format for modules (NVlabs/edm torch_utils/persistence.py), our stand-in.

A decorated class pickles as `_reconstruct_persistent_obj(meta)`, meta = dict(type='class',
version=6, module_src=<the source text of the class's module>, class_name=..., state=<the
instance's __dict__>), and records its constructor arguments (`_init_args`, `_init_kwargs`).
Unpickling with `pickle` executes module_src in a fresh module and rebuilds the instance from
it. STORED_SOURCE[module name] replaces the stored source (tests store one that must never run).
"""
import inspect
import sys
import types
import uuid

STORED_SOURCE = {}


def persistent_class(cls):
  module = sys.modules[cls.__module__]

  class Decorator(cls):

    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      self._init_args, self._init_kwargs = args, dict(kwargs)

    def __reduce__(self):
      state = super().__reduce__()[2]
      source = STORED_SOURCE.get(cls.__module__) or inspect.getsource(module)
      meta = dict(type="class", version=6, module_src=source, class_name=cls.__name__,
                  state=state)
      return _reconstruct_persistent_obj, (meta,), None

  Decorator.__name__ = Decorator.__qualname__ = cls.__name__
  Decorator.__module__ = cls.__module__
  return Decorator


def _reconstruct_persistent_obj(meta):
  name = "_imported_module_" + uuid.uuid4().hex
  module = sys.modules[name] = types.ModuleType(name)
  exec(meta["module_src"], module.__dict__)  # what a safe importer must never do
  cls = module.__dict__[meta["class_name"]]
  obj = cls.__new__(cls)
  obj.__dict__.update(meta["state"])
  return obj

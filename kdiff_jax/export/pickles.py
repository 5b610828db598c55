"""Read pickled PyTorch modules without running anything the file names.

Released checkpoints are often whole-module pickles: lumalabs/imm's `imagenet256_*.pkl` are
`pickle.dump({'ema': IMMPrecond(...), ...})` through EDM's `torch_utils/persistence.py`, which
reduces each decorated module to `_reconstruct_persistent_obj(meta)` with
meta = {type, version, module_src (the source text of the class's module), class_name, state
(the module's __dict__: _parameters, _buffers, _modules, _init_kwargs, attributes)}; `pickle.load`
would `exec(module_src)` and import every class the file names. `load` never does either: its
Unpickler resolves only the globals in `_REBUILDERS` (tensor, storage and container rebuilders,
implemented here in NumPy) and turns every other global into a `Pickled` record class, so that
calling it, `__new__` or `__setstate__` only records the arguments and state. Stored source is
kept as text (`Pickled.source`) and never compiled.

Tensors become float or int NumPy arrays (bfloat16 via ml_dtypes), from their raw storage bytes:
  * plain pickles (EDM's .pkl): a storage is `torch.storage._load_from_bytes(b)`, b a legacy
    `torch.save` of the storage: five pickles (magic number, protocol 1001, system info, the
    storage as persistent id ('storage', type, key, location, numel), [key]) and then, per key,
    a little-endian int64 count (elements of a typed storage, bytes of an untyped one) and the
    raw bytes;
  * torch's zip format (`torch.save`, .pt): `<archive>/data.pkl` with the same persistent ids,
    each storage's bytes in `<archive>/data/<key>`.

  tree = pickles.load(path)                 # dicts, lists, arrays and Pickled records
  net = tree['ema']                         # a Pickled module record
  state_dict = pickles.module_tensors(net)  # {'model.blocks.0.attn.qkv.weight': array, ...}
"""
import collections
import io
import pickle
import zipfile

import ml_dtypes
import numpy as np
from numpy._core import multiarray as _multiarray

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# torch storage class -> element dtype.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}


class Pickled(dict):
  """A stand-in for an object of a class the file names: nothing of the class is imported.

  `qualname` is 'module.Name' (or the persistent class name and its module's source in
  `source`); `args` the constructor / reduce arguments; `state` what __setstate__ received
  (a module's __dict__); dict items and list items a subclass of dict / list carried.
  """

  qualname = "?"
  source = None

  def __new__(cls, *args, **kwargs):  # pickle's NEWOBJ calls only this; REDUCE also __init__
    record = super().__new__(cls)
    record.args, record.kwargs, record.state, record.items_ = args, kwargs, None, []
    return record

  def __init__(self, *args, **kwargs):
    super().__init__()

  def __setstate__(self, state):
    self.state = state

  def append(self, item):
    self.items_.append(item)

  def extend(self, items):
    self.items_.extend(items)

  def __repr__(self):
    return f"Pickled({self.qualname})"

  __hash__ = object.__hash__
  __eq__ = object.__eq__


class _Storage:
  """A storage type named by a persistent id: its element dtype."""

  def __init__(self, name: str):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])
    self.untyped = name == "UntypedStorage"


def _record_class(module: str, name: str):
  return type(name, (Pickled,), {"qualname": f"{module}.{name}"})


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """torch._utils._rebuild_tensor_v2: the strided view of a flat storage, as a new array."""
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=tuple(size),
                                         strides=tuple(s * itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *unused):
  return data


def _rebuild_from_type(function, new_type, args, state):
  return function(*args)


def _persistent_reconstruct(meta):
  """torch_utils.persistence._reconstruct_persistent_obj: a record; module_src is not run."""
  record = type(str(meta["class_name"]), (Pickled,),
                {"qualname": str(meta["class_name"]), "source": meta.get("module_src")})()
  record.state = meta["state"]
  return record


def _latin1(text, encoding="latin1"):
  """_codecs.encode, as protocol-2 pickles use it for bytes."""
  if encoding not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
  return text.encode("latin1")


def _load_from_bytes(data: bytes):
  """torch.storage._load_from_bytes: a legacy torch.save of one storage (module docstring)."""
  stream = io.BytesIO(data)
  if _Unpickler(stream).load() != LEGACY_MAGIC:
    raise pickle.UnpicklingError("a storage in this pickle is not a legacy torch.save")
  for _ in range(2):  # protocol version, system info
    _Unpickler(stream).load()
  storages = {}
  root = _Unpickler(stream, persistent_load=lambda pid: storages.setdefault(pid[2], pid)).load()
  for key in _Unpickler(stream).load():
    storage_type = storages[key][1]
    count = int(np.frombuffer(stream.read(8), "<i8")[0])
    nbytes = count if storage_type.untyped else count * storage_type.dtype.itemsize
    storages[key] = np.frombuffer(stream.read(nbytes), storage_type.dtype.newbyteorder("<"))
  return storages[root[2]]


_NUMPY = {"_reconstruct": _multiarray._reconstruct, "scalar": _multiarray.scalar,
          "ndarray": np.ndarray, "dtype": np.dtype}

# (module, name) -> what the Unpickler builds instead of importing it.
_REBUILDERS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_reconstruct,
    **{(module, name): value for module in ("numpy", "numpy.core.multiarray",
                                            "numpy._core.multiarray")
       for name, value in _NUMPY.items()},
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, stream, persistent_load=None):
    super().__init__(stream)
    self._persistent = persistent_load
    self._records = {}

  def find_class(self, module, name):
    if (module, name) in _REBUILDERS:
      return _REBUILDERS[module, name]
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _Storage(name)
    return self._records.setdefault((module, name), _record_class(module, name))

  def persistent_load(self, pid):
    if self._persistent is None:
      raise pickle.UnpicklingError(f"persistent id {pid!r} outside a torch file")
    return self._persistent(pid)


def _load_zip(path: str):
  with zipfile.ZipFile(path) as archive:
    pkl = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
    prefix = pkl[:-len("data.pkl")]

    def storage(pid):
      _, storage_type, key, _, _ = pid[:5]
      return np.frombuffer(archive.read(f"{prefix}data/{key}"),
                           storage_type.dtype.newbyteorder("<"))

    with archive.open(pkl) as stream:
      return _Unpickler(stream, persistent_load=storage).load()


def load(path: str):
  """The object tree of a pickle or torch file (module docstring), nothing in it executed."""
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  with open(path, "rb") as stream:
    return _Unpickler(stream).load()


def module_tensors(module: Pickled, prefix: str = "") -> dict:
  """A pickled torch.nn.Module's state_dict: {dotted name: array}, parameters and persistent
  buffers of it and its submodules, as Module.state_dict() names them."""
  if not isinstance(module, Pickled) or not isinstance(module.state, dict) or (
      "_modules" not in module.state):
    raise ValueError(f"{module!r} is not a pickled torch.nn.Module")
  state = module.state
  tensors = {prefix + name: value for name, value in state.get("_parameters", {}).items()
             if value is not None}
  skip = set(state.get("_non_persistent_buffers_set", ()))
  tensors.update({prefix + name: value for name, value in state.get("_buffers", {}).items()
                  if value is not None and name not in skip})
  for name, child in state["_modules"].items():
    if child is not None:
      tensors.update(module_tensors(child, f"{prefix}{name}."))
  return tensors


def attribute(module: Pickled, name: str, default=None):
  """A plain attribute of a pickled module (its __dict__), e.g. IMMPrecond's 'T'."""
  return module.state.get(name, default) if isinstance(module.state, dict) else default


def submodule(module: Pickled, name: str) -> Pickled:
  return module.state["_modules"][name]

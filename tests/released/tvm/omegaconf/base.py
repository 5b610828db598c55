"""omegaconf 2.3.0 `omegaconf/base.py`'s metadata dataclasses, our stand-in (same fields)."""
import collections
import dataclasses
from typing import Any


@dataclasses.dataclass
class Metadata:
  ref_type: Any
  object_type: Any
  optional: bool
  key: Any
  flags: dict = dataclasses.field(default_factory=dict)
  flags_root: bool = False
  resolver_cache: dict = dataclasses.field(
      default_factory=lambda: collections.defaultdict(dict))


@dataclasses.dataclass
class ContainerMetadata(Metadata):
  key_type: Any = None
  element_type: Any = None

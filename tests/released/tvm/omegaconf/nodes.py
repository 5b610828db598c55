"""omegaconf 2.3.0 `omegaconf/nodes.py`'s AnyNode, our stand-in: a leaf value and its parent."""
from typing import Any

from omegaconf.base import Metadata


class AnyNode:

  def __init__(self, value, key=None, parent=None):
    self._metadata = Metadata(ref_type=Any, object_type=None, optional=True, key=key)
    self._parent = parent
    self._val = value

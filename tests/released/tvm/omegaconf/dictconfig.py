"""omegaconf 2.3.0 `omegaconf/dictconfig.py`'s DictConfig, our stand-in: nested dicts become
DictConfigs, leaves AnyNodes, each linked to its parent; item access returns the value."""
from typing import Any

from omegaconf.base import ContainerMetadata
from omegaconf.nodes import AnyNode


class DictConfig:

  def __init__(self, content, key=None, parent=None):
    self._metadata = ContainerMetadata(ref_type=Any, object_type=dict, optional=True, key=key,
                                       key_type=Any, element_type=Any)
    self._parent = parent
    self._content = {k: (DictConfig(v, k, self) if isinstance(v, dict) else AnyNode(v, k, self))
                     for k, v in content.items()}

  def __getitem__(self, key):
    node = self._content[key]
    return node if isinstance(node, DictConfig) else node._val

  def __getattr__(self, key):
    if key.startswith("_"):
      raise AttributeError(key)
    return self[key]

  def keys(self):
    return self._content.keys()

"""omegaconf 2.3.0 `omegaconf/dictconfig.py`'s DictConfig, our stand-in: nested dicts become
DictConfigs, lists ListConfigs, leaves AnyNodes, each linked to its parent; item access returns
the value."""
from typing import Any

from omegaconf.base import ContainerMetadata
from omegaconf.listconfig import ListConfig
from omegaconf.nodes import AnyNode


def node(value, key, parent):
  if isinstance(value, dict):
    return DictConfig(value, key, parent)
  if isinstance(value, list):
    return ListConfig(value, key, parent, node)
  return AnyNode(value, key, parent)


class DictConfig:

  def __init__(self, content, key=None, parent=None):
    self._metadata = ContainerMetadata(ref_type=Any, object_type=dict, optional=True, key=key,
                                       key_type=Any, element_type=Any)
    self._parent = parent
    self._content = {k: node(v, k, self) for k, v in content.items()}

  def __getitem__(self, key):
    child = self._content[key]
    return child._val if isinstance(child, AnyNode) else child

  def __getattr__(self, key):
    if key.startswith("_"):
      raise AttributeError(key)
    return self[key]

  def keys(self):
    return self._content.keys()

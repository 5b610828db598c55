"""omegaconf 2.3.0 `omegaconf/listconfig.py`'s ListConfig, our stand-in: `_content` a list of
nodes, with the same metadata and parent link as a DictConfig."""
from typing import Any

from omegaconf.base import ContainerMetadata


class ListConfig:

  def __init__(self, content, key, parent, node):
    self._metadata = ContainerMetadata(ref_type=Any, object_type=list, optional=True, key=key,
                                       key_type=int, element_type=Any)
    self._parent = parent
    self._content = [node(value, i, self) for i, value in enumerate(content)]

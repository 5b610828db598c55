"""omegaconf 2.3.0's config containers as they pickle, our stand-in (module paths, classes and
pickled state checked against omegaconf 2.3.0 once): a DictConfig's state is {_metadata:
base.ContainerMetadata, _parent: the enclosing DictConfig or None, _content: {key: a DictConfig,
a listconfig.ListConfig (its _content a list of nodes) or a nodes.AnyNode}}; an AnyNode's
{_metadata: base.Metadata, _parent, _val}. A config built
by `OmegaConf.create` and handed down as a nested value keeps its parent link, so the whole
config pickles with any part of it."""
from omegaconf.dictconfig import DictConfig


class OmegaConf:

  @staticmethod
  def create(content: dict) -> DictConfig:
    return DictConfig(content)


__all__ = ["DictConfig", "OmegaConf"]

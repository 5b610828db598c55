from timm.layers.format import Format  # noqa: F401
from timm.layers.mlp import Mlp  # noqa: F401
from timm.layers.patch_embed import PatchEmbed  # noqa: F401

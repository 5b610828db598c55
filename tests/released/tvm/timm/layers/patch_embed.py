"""timm 1.0.8 `timm/layers/patch_embed.py`'s PatchEmbed (what lumalabs/tvm imports through
timm.models.vision_transformer), our stand-in with its attributes and submodules: a patch conv
`proj` with bias, `norm` an Identity, tokens flattened to [N, T, D] in row-major patch order."""
from torch import nn

from timm.layers.format import Format


class PatchEmbed(nn.Module):

  def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None,
               flatten=True, output_fmt=None, bias=True, strict_img_size=True,
               dynamic_img_pad=False):
    super().__init__()
    self.patch_size = (patch_size, patch_size)
    self.img_size = (img_size, img_size)
    self.grid_size = (img_size // patch_size, img_size // patch_size)
    self.num_patches = self.grid_size[0] * self.grid_size[1]
    self.flatten = flatten
    self.output_fmt = Format.NCHW
    self.strict_img_size = strict_img_size
    self.dynamic_img_pad = dynamic_img_pad
    self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size,
                          bias=bias)
    self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

  def forward(self, x):
    x = self.proj(x)
    if self.flatten:
      x = x.flatten(2).transpose(1, 2)
    return self.norm(x)

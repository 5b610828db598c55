"""lumalabs/imm training/unets.py's SongUNet interface, our stand-in (the network is
kdiff_jax.export.torch_unet.SongUNet, whose parameter names are EDM's).

forward(x, noise_labels_t, noise_labels_s, class_labels): times already scaled (time_scale·t);
label_dim = 0 is unconditional (class_labels None).
"""
import torch

from kdiff_jax.export import torch_unet
from torch_utils import persistence


@persistence.persistent_class
class SongUNet(torch_unet.SongUNet):

  def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, model_channels=128,
               channel_mult=(1, 2, 2, 2), num_blocks=4, attn_resolutions=(16,), dropout=0.10,
               s_embed=True, **unused):
    super().__init__(input_size=img_resolution, in_channels=in_channels, num_classes=label_dim,
                     model_channels=model_channels, channel_mult=channel_mult,
                     num_blocks=num_blocks, attn_resolutions=attn_resolutions, dropout=dropout,
                     second_time_embedder=s_embed, time_scale=1.0)

  def forward(self, x, noise_labels_t, noise_labels_s=None, class_labels=None):
    expand = lambda v: v.expand(x.shape[0]) if v.shape[0] == 1 else v
    labels = torch.zeros(x.shape[0], dtype=torch.long)
    s = expand(noise_labels_s) if noise_labels_s is not None else None
    return super().forward(x, expand(noise_labels_t), labels, s)

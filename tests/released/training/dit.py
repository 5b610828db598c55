"""lumalabs/imm training/dit.py's DiT interface, our stand-in (the network is
kdiff_jax.export.torch_dit.DiT, whose parameter names are DiT's).

forward(x, noise_labels_t, noise_labels_s, class_labels): times already scaled (time_scale·t),
labels one-hot [N, num_classes] with an all-zero row for "unconditional", which
argmax([one_hot, 1 - sum]) sends to row num_classes of the label table. The table is
LabelEmbedder(num_classes + 1, D, class_dropout_prob): num_classes + 1 rows, one more (the
training-time token_drop label) when class_dropout_prob > 0.
"""
import torch
from torch import nn

from kdiff_jax.export import torch_dit
from torch_utils import persistence


@persistence.persistent_class
class DiT(torch_dit.DiT):

  def __init__(self, img_resolution, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
               num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.0, num_classes=1000,
               s_embed=True, **unused):  # IMMPrecond also passes out_channels, label_dim
    super().__init__(input_size=img_resolution, patch_size=patch_size, in_channels=in_channels,
                     hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                     mlp_ratio=mlp_ratio, num_classes=num_classes, second_time_embedder=s_embed,
                     time_scale=1.0)
    self.s_embed = s_embed
    self.y_embedder.embedding_table = nn.Embedding(
        num_classes + 1 + (class_dropout_prob > 0), hidden_size)

  def forward(self, x, noise_labels_t, noise_labels_s=None, class_labels=None):
    is_uncond = 1 - class_labels.sum(dim=1, keepdim=True)
    y = torch.cat([class_labels, is_uncond], dim=1).argmax(dim=1)
    expand = lambda v: v.expand(x.shape[0]) if v.shape[0] == 1 else v
    s = expand(noise_labels_s) if noise_labels_s is not None and self.s_embed else None
    return super().forward(x, expand(noise_labels_t), y, s)

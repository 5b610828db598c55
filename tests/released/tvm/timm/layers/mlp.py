"""timm 1.0.8 `timm/layers/mlp.py`'s Mlp, our stand-in: fc1, act, drop1, norm (Identity), fc2,
drop2."""
from torch import nn


class Mlp(nn.Module):

  def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU,
               norm_layer=None, bias=True, drop=0.0, use_conv=False):
    super().__init__()
    out_features = out_features or in_features
    hidden_features = hidden_features or in_features
    self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
    self.act = act_layer()
    self.drop1 = nn.Dropout(drop)
    self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
    self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
    self.drop2 = nn.Dropout(drop)

  def forward(self, x):
    return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))

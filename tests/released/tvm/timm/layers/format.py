"""timm 1.0.8 `timm/layers/format.py`'s Format, our stand-in (a str Enum, pickled by value)."""
from enum import Enum


class Format(str, Enum):
  NCHW = "NCHW"
  NHWC = "NHWC"
  NCL = "NCL"
  NLC = "NLC"

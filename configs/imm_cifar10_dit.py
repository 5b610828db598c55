"""IMM on CIFAR-10 pixels with a DiT-B/2 backbone: configs/imm_cifar10.py's recipe (docs/objectives/imm.md)
with a transformer in place of the paper's U-Net.

Differences from the paper, said plainly:
* backbone: a DiT-B/2 (256 tokens on 32x32), not the 55M DDPM++ U-Net (configs/imm_cifar10.py
  has that one), so the paper's FIDs are not this config's; no dropout (the U-Net's 0.2);
* class-conditional: this trains on CIFAR's labels (data.num_classes = 10, label dropout 0.1)
  and samples without guidance (w = 1); the paper's model is unconditional (data.num_classes = 0
  would make this DiT unconditional too);
* optimizer: AdamW with the paper's lr / betas / eps (the trainer has no RAdam).

  python main.py --config=configs/imm_cifar10_dit.py --workdir=$WORKDIR
"""
from configs import imm_cifar10


def get_config():
  config = imm_cifar10.get_config()
  config.model.name = "dit"
  config.model.size = "B"
  config.model.patch_size = 2
  config.model.dropout = 0.0
  config.data.num_classes = 10              # CIFAR's classes (imm_cifar10 is unconditional)
  config.objective.label_dropout = 0.1
  return config

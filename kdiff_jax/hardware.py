"""What the accelerators can do, from their datasheets, and TPU slices for deviceless compiles.

  peak = hardware.spec("TPU v5p").bf16_flops      # by jax's device_kind; None when unknown
  devices = hardware.tpu_slice("v5p:4x4x4").devices   # a v5p-128 slice's 64 chips, no TPU needed

Datasheet figures (per chip; Google Cloud TPU system-architecture pages, NVIDIA datasheets):

  device      bf16 dense   HBM        ICI (bidirectional)   chips/host   a jax device is
  TPU v4      275 TFLOP/s  32 GiB     -                     4            a chip (megacore)
  TPU v5e     197 TFLOP/s  16 GB      400 GB/s              4 (training) a chip
  TPU v5p     459 TFLOP/s  95 GB      600 GB/s (4800 Gbps)  4            a chip (megacore)
  TPU v6e     918 TFLOP/s  32 GB      800 GB/s              4 (training) a chip
  H100 SXM    989 TFLOP/s  80 GB      -                     -            a GPU
  H200        989 TFLOP/s  141 GB     -                     -            a GPU
  A100 SXM    312 TFLOP/s  40/80 GB   -                     -            a GPU

TPU v4 and v5p chips hold two TensorCores that a TPU VM runs as one device ("megacore"):
libtpu's deviceless topologies model each TensorCore as a device (16 GB of a v4 chip's 32 GiB)
unless asked for chip_config_name='megacore', which `tpu_slice` does for them, as on a real VM.
"""
import dataclasses

GB, GiB = 1e9, 2**30


@dataclasses.dataclass(frozen=True)
class Spec:
  name: str
  bf16_flops: float            # dense peak, FLOP/s per device
  hbm_bytes: float | None      # per device
  ici_bytes_per_second: float | None = None   # bidirectional, per chip
  chips_per_host: int | None = None
  chip_config: str = "default"  # libtpu's chip_config_name for one device per chip


SPECS = {
    "TPU v4": Spec("TPU v4", 275e12, 32 * GiB, None, 4, "megacore"),
    "TPU v5 lite": Spec("TPU v5e", 197e12, 16 * GB, 400 * GB, 4),
    "TPU v5e": Spec("TPU v5e", 197e12, 16 * GB, 400 * GB, 4),
    "TPU v5": Spec("TPU v5p", 459e12, 95 * GB, 600 * GB, 4, "megacore"),
    "TPU v5p": Spec("TPU v5p", 459e12, 95 * GB, 600 * GB, 4, "megacore"),
    "TPU v6 lite": Spec("TPU v6e", 918e12, 32 * GB, 800 * GB, 4),
    "TPU v6e": Spec("TPU v6e", 918e12, 32 * GB, 800 * GB, 4),
    "NVIDIA H100 80GB HBM3": Spec("H100 SXM", 989e12, 80 * GB),
    "NVIDIA H200": Spec("H200", 989e12, 141 * GB),
    "NVIDIA A100-SXM4-80GB": Spec("A100 SXM", 312e12, 80 * GB),
    "NVIDIA A100-SXM4-40GB": Spec("A100 SXM", 312e12, 40 * GB),
}
# topology prefix (v5p:4x4x4) -> device_kind
GENERATIONS = {"v4": "TPU v4", "v5e": "TPU v5e", "v5p": "TPU v5p", "v6e": "TPU v6e"}


def spec(device_kind: str) -> Spec | None:
  """The datasheet of jax's `device.device_kind`, or None for a device not in the table."""
  return SPECS.get(device_kind)


def tpu_slice(topology: str, num_slices: int = 1, host_bounds: tuple | None = None):
  """The deviceless TopologyDescription of a slice such as 'v5p:4x4x4' (or num_slices of them):
  one device per chip; hosts of 2x2x1 chips (a TPU VM's 4) unless host_bounds says otherwise.
  Needs libtpu, no TPU."""
  from jax.experimental import topologies
  generation, _, shape = topology.partition(":")
  if generation not in GENERATIONS or not shape:
    raise ValueError(f"topology {topology!r}: give <generation>:<shape> with generation one of "
                     f"{sorted(GENERATIONS)}, e.g. v5p:4x4x4 or v5e:16x16")
  chip = SPECS[GENERATIONS[generation]]
  dims = [int(d) for d in shape.split("x")]
  dims += [1] * (3 - len(dims))
  host = host_bounds or ((2, 2, 1) if dims[0] * dims[1] >= 4 else tuple(dims))
  return topologies.get_topology_desc(
      topology_name=topology, platform="tpu", chip_config_name=chip.chip_config,
      chips_per_host_bounds=host, num_slices=num_slices)

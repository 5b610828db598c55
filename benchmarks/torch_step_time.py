"""The PyTorch side of benchmarks/step_time.py: our torch DiT twin (kdiff_jax/export) trained with
the same flow-matching loss, the way a PyTorch user runs it. Prints a Markdown table.

  python benchmarks/torch_step_time.py --sizes=B,L,XL --batch_sizes=256          # a GPU
  python benchmarks/torch_step_time.py --sizes=T --batch_sizes=8 --image_size=8 \\
      --device=cpu --noautocast --nocompile --sdpa=math --nofused_adamw          # a CPU check

The step (as facebookresearch/DiT's train.py, with the flow-matching loss of the default config):
t ~ U[0, 1], n ~ N(0, I), x_t = (1 - t)·x + t·n, labels dropped to the null label with p = 0.1,
loss = mean((DiT(x_t, t, y) - (n - x))²); backward; AdamW (lr 1e-4, betas (0.9, 0.999), no
decay); an EMA of the weights (decay 0.9999) updated every step — the same work as our train step.

What a PyTorch user turns on, each with a flag that turns it off (so it runs on a CPU):
  --autocast       the forward and loss under torch.autocast(bfloat16); master weights float32
  --compile        torch.compile(model) (inductor; its compile happens in the first steps)
  --sdpa=flash     F.scaled_dot_product_attention restricted to the flash kernel
                   (torch.nn.attention.sdpa_kernel); 'efficient', 'cudnn', 'math', or 'default'
                   (PyTorch's own choice)
  --fused_adamw    torch.optim.AdamW(fused=True)
  --tf32           float32 matmuls on TF32 tensor cores (GPU)

Columns: step time (median and spread over --steps timed steps after --warmup, each ending in a
device synchronise), images/s, the same analytic model FLOPs per image as step_time.py
(6·dit.forward_macs), MFU against the device's bf16 dense peak (kdiff_jax/hardware.py by the
CUDA device name; --peak_tflops overrides), the peak memory torch allocated in the row
(torch.cuda.max_memory_allocated; 'n/a' on a CPU) and the seconds of the first --warmup steps
(torch.compile's compile happens there).
"""
import contextlib
import os
import sys
import time

# The model table and the FLOP count live in the JAX package; keep JAX off the GPU here.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import tables  # noqa: E402
from kdiff_jax import hardware  # noqa: E402
from kdiff_jax.export.torch_dit import DiT  # noqa: E402  (the torch twin of models/dit.py)
from kdiff_jax.models import dit  # noqa: E402

flags.DEFINE_list("sizes", ["T", "XS", "S"], "DiT sizes (models/dit.py SIZES).")
flags.DEFINE_list("batch_sizes", ["16", "64"], "Batch sizes.")
flags.DEFINE_integer("patch_size", 2, "Patch size.")
flags.DEFINE_integer("image_size", 32, "Input height = width.")
flags.DEFINE_integer("channels", 4, "Input channels (4 = SD-VAE latents).")
flags.DEFINE_integer("num_classes", 1000, "Label classes (the null label is num_classes).")
flags.DEFINE_string("device", "auto", "auto (cuda when present) | cuda | cpu.")
flags.DEFINE_bool("autocast", True, "bfloat16 autocast of the forward and loss.")
flags.DEFINE_bool("compile", True, "torch.compile the model.")
flags.DEFINE_enum("sdpa", "flash", ["flash", "efficient", "cudnn", "math", "default"],
                  "The scaled_dot_product_attention kernel.")
flags.DEFINE_bool("fused_adamw", True, "torch.optim.AdamW(fused=True).")
flags.DEFINE_bool("tf32", True, "TF32 float32 matmuls (GPU).")
flags.DEFINE_bool("ema", True, "Update an EMA of the weights every step, as our step does.")
flags.DEFINE_integer("warmup", 3, "Untimed steps first (torch.compile compiles here).")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_float("peak_tflops", None, "Peak FLOP/s per device in TFLOP/s for MFU.")
flags.DEFINE_string("output", "", "Also write the table (Markdown) to this file.")
flags.DEFINE_integer("seed", 0, "torch.manual_seed.")
FLAGS = flags.FLAGS

LABEL_DROPOUT, LEARNING_RATE, EMA_DECAY = 0.1, 1e-4, 0.9999
FLOP_FACTOR = 6   # forward 2 + backward 4 FLOPs per forward MAC, as step_time.py's 'flow'


def sdpa_context():
  if FLAGS.sdpa == "default":
    return contextlib.nullcontext()
  from torch.nn.attention import SDPBackend, sdpa_kernel
  backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[FLAGS.sdpa]
  return sdpa_kernel(backend)


def flow_matching_loss(model, x, y, generator, autocast: bool, device):
  """mean((v_θ(x_t, t, y) - (n - x))²), x_t = (1 - t)·x + t·n, y -> null with p = 0.1."""
  batch = x.shape[0]
  t = torch.rand(batch, device=device, generator=generator)
  n = torch.randn(x.shape, device=device, generator=generator)
  drop = torch.rand(batch, device=device, generator=generator) < LABEL_DROPOUT
  y = torch.where(drop, torch.full_like(y, FLAGS.num_classes), y)
  x_t = (1 - t)[:, None, None, None] * x + t[:, None, None, None] * n
  with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
    prediction = model(x_t, t, y)
  return F.mse_loss(prediction.float(), n - x)


def synchronize(device):
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def run(size: str, batch: int, device, peak):
  depth, hidden_size, num_heads = dit.SIZES[size][:3]
  torch.manual_seed(FLAGS.seed)
  model = DiT(input_size=FLAGS.image_size, patch_size=FLAGS.patch_size,
              in_channels=FLAGS.channels, hidden_size=hidden_size, depth=depth,
              num_heads=num_heads, num_classes=FLAGS.num_classes).to(device)
  params = [p for p in model.parameters() if p.requires_grad]
  ema = [p.detach().clone() for p in params]
  optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0.0, fused=FLAGS.fused_adamw or None)
  forward = torch.compile(model) if FLAGS.compile else model
  generator = torch.Generator(device=device).manual_seed(FLAGS.seed)
  x = torch.randn(batch, FLAGS.channels, FLAGS.image_size, FLAGS.image_size, device=device,
                  generator=generator)
  y = torch.randint(0, FLAGS.num_classes, (batch,), device=device, generator=generator)

  def step():
    optimizer.zero_grad(set_to_none=True)
    with sdpa_context():
      loss = flow_matching_loss(forward, x, y, generator, FLAGS.autocast, device)
      loss.backward()
    optimizer.step()
    if FLAGS.ema:
      with torch.no_grad():
        torch._foreach_lerp_(ema, params, 1.0 - EMA_DECAY)
    return loss

  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)
  start = time.perf_counter()
  for _ in range(FLAGS.warmup):
    step()
  synchronize(device)
  warmup_seconds = time.perf_counter() - start
  times = []
  for _ in range(FLAGS.steps):
    start = time.perf_counter()
    loss = step()
    synchronize(device)
    times.append(time.perf_counter() - start)
  if not torch.isfinite(loss):
    raise FloatingPointError(f"loss {loss.item()}")
  median = float(np.median(times))
  images = batch / median
  macs = dit.forward_macs(input_size=FLAGS.image_size, in_channels=FLAGS.channels,
                          patch_size=FLAGS.patch_size, hidden_size=hidden_size, depth=depth)
  model_flops = FLOP_FACTOR * macs
  mfu = f"{model_flops * images / peak:.1%}" if peak else "n/a"
  memory = (f"{torch.cuda.max_memory_allocated(device) / 1e9:.2f}" if device.type == "cuda"
            else "n/a")
  num_params = sum(p.numel() for p in params)
  return (f"| DiT-{size}/{FLAGS.patch_size} | flow | {num_params / 1e6:.1f}M | {batch} | "
          f"{median * 1e3:.1f} | {min(times) * 1e3:.1f}-{max(times) * 1e3:.1f} | {images:.1f} | "
          f"{model_flops / 1e9:.4g} | {mfu} | {memory} | {warmup_seconds:.1f} |")


HEADER = ("| model | objective | params | batch | step ms (median) | spread ms (min-max) | "
          "images/s | model GFLOP/img | MFU | peak memory GB | first steps s |")


def main(argv):
  del argv
  if FLAGS.device == "auto":
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  else:
    device = torch.device(FLAGS.device)
  name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
  spec = hardware.spec(name)
  peak = FLAGS.peak_tflops * 1e12 if FLAGS.peak_tflops else (spec.bf16_flops if spec else None)
  if device.type == "cuda" and FLAGS.tf32:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  lines = [
      f"device: {name} ({device.type}), torch {torch.__version__}; peak "
      + (f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (MFU n/a)")
      + f"; {FLAGS.image_size}x{FLAGS.image_size}x{FLAGS.channels}, patch {FLAGS.patch_size}; "
      f"autocast bf16={FLAGS.autocast}, compile={FLAGS.compile}, sdpa={FLAGS.sdpa}, "
      f"fused AdamW={FLAGS.fused_adamw}, tf32={FLAGS.tf32}, EMA={FLAGS.ema}; "
      f"{FLAGS.warmup} warm-up + {FLAGS.steps} timed steps",
      f"model FLOPs/img = {FLOP_FACTOR}·dit.forward_macs (as step_time.py)",
      "",
      HEADER,
      "|" + "---|" * (HEADER.count("|") - 1),
  ]
  with tables.table_writer(FLAGS.output, lines) as emit:
    for size in FLAGS.sizes:
      for batch in map(int, FLAGS.batch_sizes):
        try:
          row = run(size, batch, device, peak)
        except Exception as error:  # noqa: BLE001 - an out-of-memory or refusal is a result
          message = str(error).split("\n")[0][:200].replace("|", "/")
          row = (f"| DiT-{size}/{FLAGS.patch_size} | flow | | {batch} | "
                 f"{type(error).__name__}: {message} |")
          if device.type == "cuda":
            torch.cuda.empty_cache()
        emit(row)


if __name__ == "__main__":
  app.run(main)

r"""The PyTorch twin of our simple_cnn and resnet18: R runs trained one after the other.

  python -m launch.torch_twin --model=resnet18 --batch_size=64 --image_size=32 --runs=8 \
    [--steps=20] [--bf16] [--no_channels_last] [--compile] [--flops_per_image=F]

The baseline a group of runs (`launch.benchmark --runs_per_program=R`) is compared with: the
same layer shapes as `reinit.models` (SimpleCNN: 3 stages of two conv3x3-BN-ReLU blocks, the
second with a 2x2 max-pool, widths 32/64/128, GAP, dense; ResNet18: BasicBlocks [2, 2, 2, 2],
widths 64/128/256/512, the 'cifar' stem up to 64 px and the 'imagenet' stem above, projection
shortcuts where the shape changes; every unit but the head ends with the inactive
`Standardize`, computed as in Flax), trained by SGD with Nesterov momentum 0.9 and weight decay
5e-4 on the kernels, on a device-resident synthetic batch. Each of the R runs builds its model
(seed r), takes 2 warm-up steps, then `--steps` timed steps; the timed steps of all runs give
images/s and the mean step time. MFU uses `--flops_per_image` (pass the JAX benchmark's
`train_flops_per_image` to compare at the same FLOP count) or else torch's FLOP counter of one
train step, over the peak of `launch.benchmark`'s table. Prints one JSON line.
"""

import argparse
import json
import math
import sys
import time

import torch
from torch import nn
import torch.nn.functional as F

_WARMUP_STEPS = 2
SMALL_IMAGE_MAX_SIDE = 64  # reinit.models.resnet: the 'cifar' stem up to this side


class Standardize(nn.Module):
  """y = x + active * ((x - mean) / sqrt(var + eps) - x); inactive (active = 0) as at stage 0."""

  def __init__(self, channels: int, eps: float = 1e-5):
    super().__init__()
    self.eps = eps
    self.register_buffer("active", torch.zeros(()))
    self.register_buffer("mean", torch.zeros(channels))
    self.register_buffer("var", torch.ones(channels))

  def forward(self, x):
    shape = (1, -1, 1, 1)
    scale = torch.rsqrt(self.var + self.eps).view(shape).to(x.dtype)
    standardized = (x - self.mean.view(shape).to(x.dtype)) * scale
    return x + self.active.to(x.dtype) * (standardized - x)


def _bn(channels: int) -> nn.BatchNorm2d:
  # Flax BatchNorm(momentum=0.9) keeps 0.9 of the old statistics: torch's momentum=0.1.
  return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)


class ConvBlock(nn.Module):
  """conv3x3 (SAME, no bias) -> BN -> ReLU [-> max-pool 2x2] -> Standardize."""

  def __init__(self, cin: int, cout: int, pool: bool):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    self.bn = _bn(cout)
    self.pool = pool
    self.norm = Standardize(cout)

  def forward(self, x):
    x = F.relu(self.bn(self.conv(x)))
    if self.pool:
      # Flax's SAME 2x2 pool of an odd side pads with -inf: ceil_mode does the same.
      x = F.max_pool2d(x, 2, 2, ceil_mode=True)
    return self.norm(x)


class SimpleCNN(nn.Module):
  """(N, C, H, W) -> (N, classes) logits; `reinit.models.SimpleCNN`."""

  def __init__(self, num_classes: int, width: float = 1.0, widths=(32, 64, 128)):
    super().__init__()
    blocks, cin = [], 3
    for stage_width in widths:
      features = max(1, int(round(stage_width * width)))
      for pool in (False, True):
        blocks.append(ConvBlock(cin, features, pool))
        cin = features
    self.blocks = nn.Sequential(*blocks)
    self.head = nn.Linear(cin, num_classes)

  def forward(self, x):
    return self.head(self.blocks(x).mean(dim=(2, 3)))


class BasicBlock(nn.Module):
  """conv3x3(stride)-BN-ReLU-conv3x3-BN + shortcut, ReLU, Standardize."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
    self.bn1 = _bn(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
    self.bn2 = _bn(cout)
    self.shortcut = None
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))
    self.norm = Standardize(cout)

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    shortcut = x if self.shortcut is None else self.shortcut(x)
    return self.norm(F.relu(y + shortcut))


class ResNet18(nn.Module):
  """(N, C, H, W) -> (N, classes) logits; `reinit.models.ResNet18` with stem='auto'."""

  def __init__(self, num_classes: int, image_size: int, width: float = 1.0,
               widths=(64, 128, 256, 512), stage_sizes=(2, 2, 2, 2)):
    super().__init__()
    scaled = lambda w: max(1, int(round(w * width)))
    stem = scaled(widths[0])
    imagenet = image_size > SMALL_IMAGE_MAX_SIDE
    layers = ([nn.Conv2d(3, stem, 7, 2, padding=3, bias=False)] if imagenet
              else [nn.Conv2d(3, stem, 3, padding=1, bias=False)])
    layers += [_bn(stem), nn.ReLU()]
    if imagenet:
      layers.append(nn.MaxPool2d(3, 2, padding=1))
    layers.append(Standardize(stem))
    cin, blocks = stem, []
    for stage, (stage_width, size) in enumerate(zip(widths, stage_sizes)):
      for i in range(size):
        blocks.append(BasicBlock(cin, scaled(stage_width), 2 if stage > 0 and i == 0 else 1))
        cin = scaled(stage_width)
    self.stem = nn.Sequential(*layers)
    self.blocks = nn.Sequential(*blocks)
    self.head = nn.Linear(cin, num_classes)

  def forward(self, x):
    return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def make_model(name: str, *, num_classes: int, image_size: int, width: float) -> nn.Module:
  if name == "simple_cnn":
    return SimpleCNN(num_classes, width)
  if name == "resnet18":
    return ResNet18(num_classes, image_size, width)
  raise ValueError(f"model={name!r} is unknown; accepted: resnet18, simple_cnn")


def make_optimizer(model: nn.Module, learning_rate: float) -> torch.optim.Optimizer:
  """SGD, Nesterov momentum 0.9, weight decay 5e-4 on conv and dense kernels only (as
  `reinit.train.make_optimizer` with `tree.kernels`)."""
  kernels = [p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1]
  others = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.ndim > 1)]
  return torch.optim.SGD([{"params": kernels, "weight_decay": 5e-4},
                          {"params": others, "weight_decay": 0.0}],
                         lr=learning_rate, momentum=0.9, nesterov=True)


def make_train_step(model, optimizer, *, bf16: bool, device: torch.device):
  def step(images, labels):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
      loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss
  return step


def counted_flops_per_image(args, device) -> float:
  """FLOPs of one train step (forward + backward) by torch's counter, per image."""
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
  model = make_model(args.model, num_classes=args.num_classes, image_size=args.image_size,
                     width=args.width).to(device)
  images, labels = synthetic_batch(args, device)
  with FlopCounterMode(display=False) as counter:
    F.cross_entropy(model(images), labels).backward()
  return counter.get_total_flops() / args.batch_size


def synthetic_batch(args, device):
  generator = torch.Generator().manual_seed(0)
  images = torch.randn(args.batch_size, 3, args.image_size, args.image_size,
                       generator=generator)
  labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator)
  memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
  return images.to(device).to(memory_format=memory_format), labels.to(device)


def _sync(device):
  if device.type == "cuda":
    torch.cuda.synchronize()


def peak_flops(device, bf16: bool) -> float | None:
  """Dense peak FLOP/s of the device from `launch.benchmark`'s table; None on CPU/unknown."""
  if device.type != "cuda":
    return None
  from launch.benchmark import _PEAK_FLOPS  # pylint: disable=g-import-not-at-top
  kind = torch.cuda.get_device_name(device).lower()
  for name, peaks in _PEAK_FLOPS.items():
    if name in kind:
      return peaks["bfloat16" if bf16 else "float32"]
  return None


def run_twin(args) -> dict:
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  if device.type == "cuda":
    torch.backends.cudnn.benchmark = True
    # float32 convs and matmuls as TF32, as JAX's default precision does on NVIDIA GPUs.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  images, labels = synthetic_batch(args, device)
  timed_s = 0.0
  for run in range(args.runs):
    torch.manual_seed(run)
    model = make_model(args.model, num_classes=args.num_classes, image_size=args.image_size,
                       width=args.width).to(device)
    if args.channels_last:
      model = model.to(memory_format=torch.channels_last)
    model.train()
    step = make_train_step(model, make_optimizer(model, 0.01), bf16=args.bf16, device=device)
    if args.compile:
      step = torch.compile(step)
    for _ in range(_WARMUP_STEPS):
      step(images, labels)
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
      loss = step(images, labels)
    _sync(device)
    timed_s += time.perf_counter() - start
    if not math.isfinite(float(loss.detach())):
      raise FloatingPointError(f"run {run}: non-finite loss")
  step_s = timed_s / (args.runs * args.steps)
  flops_source = "argument"
  flops_per_image = args.flops_per_image
  if flops_per_image is None:
    flops_per_image, flops_source = counted_flops_per_image(args, device), "torch_flop_counter"
  peak = peak_flops(device, args.bf16)
  return {
      "framework": "torch", "torch_version": torch.__version__, "model": args.model,
      "batch_size": args.batch_size, "image_size": args.image_size, "width": args.width,
      "runs": args.runs, "steps": args.steps, "bf16": args.bf16,
      "channels_last": args.channels_last, "compile": args.compile,
      "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
      "cpu_threads": torch.get_num_threads(),
      "images_per_s": round(args.batch_size / step_s, 2),
      "step_ms": round(1000 * step_s, 3),
      "flops_per_image": flops_per_image, "flops_source": flops_source,
      "mfu": None if peak is None else flops_per_image * args.batch_size / step_s / peak,
  }


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet18", choices=("resnet18", "simple_cnn"))
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--width", type=float, default=1.0)
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--runs", type=int, default=1, help="runs trained one after the other")
  parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
  parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
  parser.add_argument("--no_channels_last", dest="channels_last", action="store_false")
  parser.add_argument("--compile", action="store_true", help="torch.compile the train step")
  parser.add_argument("--flops_per_image", type=float, default=None,
                      help="FLOPs of one image's train step (default: torch's counter)")
  args = parser.parse_args(argv)
  for field in ("batch_size", "image_size", "runs", "steps", "num_classes"):
    if getattr(args, field) < 1:
      parser.error(f"--{field}={getattr(args, field)} is invalid; accepted: a positive integer")
  return args


def main(argv=None):
  print(json.dumps(run_twin(parse_args(argv))), flush=True)


if __name__ == "__main__":
  sys.exit(main())

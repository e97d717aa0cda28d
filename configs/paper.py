r"""The study as sweeps: every method of the paper's comparison, seeds and training-set sizes.

Laptop (the README's main job; about 5 minutes on 2 CPU cores, offline):

  python -m launch.reproduce configs/paper.py:study=digits --workdir=runs/digits

  12 methods x 3 seeds of SimpleCNN (half width) on 100 class-balanced `digits` examples (10
  per class), 10 epochs per stage; then the margin/norm/flatness analyses of `baseline` and `lw` (seed 0)
  and the report (Tables 2 and 3, figures) in runs/digits/report.

Cluster (12 datasets x 4 architectures x 12 methods x 3 seeds x 2-3 training-set sizes,
4,752 runs; LW with ResNet-50 has 18 stages of 50 epochs: its units are the stem, 16 blocks
and the head, so K = 17 reinitializations):

  python -m launch.reproduce configs/paper.py:study=full --workdir=gs://BUCKET/paper --dry_run

  prints one `launch.main` command per run for a scheduler (launch/slurm_gpu.sh,
  launch/tpu_pod.sh); once they are done, `python -m launch.report gs://BUCKET/paper` builds
  the report. The datasets must be prepared in `data_dir` (`tfds build`). Its cost has not been
  measured: it is dominated by the 18-stage ResNet-50 runs on the whole splits; estimate it
  from `python -m launch.benchmark --model=resnet50 ...` (images/s) times the examples each
  run sees (`compute.examples_seen` in results.json).

Training-set sizes per dataset: 10 and 50 examples per class (class-balanced, seed-determined)
and the whole train split, smaller ones dropped where they exceed the split.
"""

from configs import benchmark
from reinit import methods

STUDIES = ("digits", "full")
SEEDS = (0, 1, 2)
FULL_MODELS = ("simple_cnn", "vgg16", "resnet18", "resnet50")
FULL_DATASETS = tuple(key for key in benchmark.DATASETS if key != "digits")


def _spec(arg: str | None) -> dict:
  spec = benchmark.parse_arg(arg, study="digits", dataset="", model="", method="lw")
  if spec["study"] not in STUDIES:
    raise ValueError(f"study={spec['study']!r} is unknown; accepted: {', '.join(STUDIES)}")
  return spec


def get_config(arg: str | None = None):
  """One run of the study: `study=digits|full` plus the run's dataset, model and method."""
  spec = _spec(arg)
  dataset = spec["dataset"] or ("digits" if spec["study"] == "digits" else "cifar10")
  model = spec["model"] or "simple_cnn"
  config = benchmark.get_config(f"dataset={dataset},model={model},method={spec['method']}")
  if spec["study"] == "digits":
    config.width = 0.5  # half the channels: a quarter of the compute, 1 point less accurate
    config.train_examples = 100
    config.batch_size = 32
    config.epochs_per_stage = 10
    config.log_every_steps = 100
  else:
    config.batch_size = 128
    config.epochs_per_stage = 50
    config.learning_rate = 0.1
    config.log_every_steps = 200
    config.checkpoint_every_steps = 2000
  return config


def training_sizes(dataset: str) -> tuple[int, ...]:
  """10 and 50 examples per class, and -1 (the whole split), where the split allows."""
  info = benchmark.DATASETS[dataset]
  sizes = [n * info.num_classes for n in (10, 50)
           if info.train_size and n * info.num_classes < info.train_size]
  return (*sizes, -1)


def get_sweep(arg: str | None = None) -> list[dict]:
  """The runs of the study; see the module docstring."""
  spec = _spec(arg)
  if spec["study"] == "digits":
    return [dict(method=method, seed=seed) for method in methods.METHODS for seed in SEEDS]
  return [dict(dataset=dataset, model=model, method=method, train_examples=size, seed=seed)
          for dataset in FULL_DATASETS for model in FULL_MODELS
          for size in training_sizes(dataset) for method in methods.METHODS for seed in SEEDS]


def analyzed_runs(arg: str | None = None) -> list[dict]:
  """The runs `launch.reproduce` analyzes (margins, norms, flatness) before the report."""
  if _spec(arg)["study"] == "digits":
    return [dict(method="baseline", seed=0), dict(method="lw", seed=0)]
  return []

r"""The study as sweeps: every method of the paper's comparison, seeds and training-set sizes.

Laptop (offline; 1.5 to 2 minutes on 2 CPU cores from a warm compile cache):

  python -m launch.reproduce configs/paper.py:study=digits --workdir=runs/digits

  12 methods x 3 seeds of SimpleCNN (half width) on 100 class-balanced `digits` examples (10
  per class), 10 epochs per stage; then the margin/norm/flatness analyses of `baseline` and `lw` (seed 0)
  and the report (Tables 2 and 3, figures) in runs/digits/report.

Grown (the README's main job: the same study over 5 seeds and 3 training-set sizes, so that
Table 3 has several combinations; 4.5 to 5 minutes on 2 CPU cores from a warm compile cache,
about 9 cold):

  python -m launch.reproduce configs/paper.py:study=digits_grown --workdir=runs/digits_grown

  12 methods x 5 seeds x 50, 100 and 200 examples (180 runs, 36 groups of 5), at 15, 8 and 4
  epochs a stage: about 30 steps a stage at every size (an epoch is ceil(n / 32) batches: 30,
  32 and 28), so that the smallest size is not starved of steps nor the largest given more;
  then the analyses of `baseline` and `lw` (seed 0, 100 examples) and the report.

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

STUDIES = ("digits", "digits_grown", "full")
SEEDS = (0, 1, 2)
GROWN_SEEDS = (0, 1, 2, 3, 4)
# study=digits_grown: epochs a stage per training-set size, about 30 steps a stage at batch 32.
GROWN_EPOCHS = {50: 15, 100: 8, 200: 4}
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
  laptop = spec["study"] in ("digits", "digits_grown")
  dataset = spec["dataset"] or ("digits" if laptop else "cifar10")
  model = spec["model"] or "simple_cnn"
  config = benchmark.get_config(f"dataset={dataset},model={model},method={spec['method']}")
  if laptop:  # digits_grown's runs set their own train_examples and epochs_per_stage
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
  if spec["study"] == "digits_grown":
    return [dict(method=method, train_examples=size, epochs_per_stage=epochs, seed=seed)
            for size, epochs in GROWN_EPOCHS.items() for method in methods.METHODS
            for seed in GROWN_SEEDS]
  return [dict(dataset=dataset, model=model, method=method, train_examples=size, seed=seed)
          for dataset in FULL_DATASETS for model in FULL_MODELS
          for size in training_sizes(dataset) for method in methods.METHODS for seed in SEEDS]


def analyzed_runs(arg: str | None = None) -> list[dict]:
  """The runs `launch.reproduce` analyzes (margins, norms, flatness) before the report."""
  study = _spec(arg)["study"]
  if study == "digits":
    return [dict(method="baseline", seed=0), dict(method="lw", seed=0)]
  if study == "digits_grown":
    return [dict(method=method, train_examples=100, seed=0) for method in ("baseline", "lw")]
  return []

"""What the launchers share: the XLA CPU setup, one-line user errors, running a config."""

import logging
import os
import sys

# Before jax is imported anywhere: TF (used by the input pipeline) must not grab accelerators'
# memory, and its C++ logs drown the run's own.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# XLA's CPU backend: convolutions fused one by one into the YNNPACK path ran the train step of
# simple_cnn (batch 128, 32x32x3) at 230 images/s on 2 cores; leaving them to XLA's own
# (Eigen) convolutions with this flag, at 440 (README, "Performance"). CPU-only; a value the
# user sets in XLA_FLAGS wins. Only for jaxlibs known to have the flag: XLA aborts the process
# on a flag it does not know.
_TESTED_JAXLIBS = ((0, 10),)  # (major, minor)


def _jaxlib_version() -> tuple[int, ...] | None:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return tuple(int(part) for part in metadata.version("jaxlib").split(".")[:2])
  except (metadata.PackageNotFoundError, ValueError):
    return None


if ("xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", "")
    and _jaxlib_version() in _TESTED_JAXLIBS):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_"
                             "fusion_type=-individual_convolution").strip()
# Runs of a sweep compile the same programs (one train step per model and shape): JAX's
# persistent compilation cache makes every compile after the first a file read. Set the
# variable to another folder, or to an empty string to turn the cache off.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.expanduser("~"), ".cache", "reinit", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def fail(message: str, *, status: int = 2):
  """Prints `error: message` on one line to stderr and exits with `status`."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


# Exit statuses of the launchers: 2 a user error, 3 a diverged run, PREEMPTED a run stopped by
# SIGTERM/SIGUSR1 after checkpointing its current step (sysexits' EX_TEMPFAIL: "try again";
# the same command resumes it). Slurm array tasks requeue themselves on it (launch/slurm).
PREEMPTED = 75


def run_or_exit(config, workdir: str) -> dict:
  """`train_and_evaluate(config, workdir)`; a ConfigError exits with its one-line message."""
  from reinit import train  # pylint: disable=g-import-not-at-top
  try:
    return train.train_and_evaluate(config, workdir)
  except train.ConfigError as e:
    fail(str(e))
  except train.TrainingDiverged as e:
    fail(str(e), status=3)
  except train.Preempted as e:
    fail(str(e), status=PREEMPTED)


def initialize_distributed() -> None:
  """`jax.distributed.initialize()` for `--distributed`, the cluster found from the
  environment (TPU pod, Slurm's srun, Open MPI's mpirun, or JAX_COORDINATOR_ADDRESS); when it
  finds none or cannot reach its coordinator, exits with one line, status 2, before anything
  is written."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    jax.distributed.initialize()
  except (ValueError, RuntimeError) as e:
    fail(f"distributed: jax.distributed.initialize() failed ({one_line(e)}); accepted: "
         "--distributed on every process of a cluster JAX detects (a TPU pod's hosts, srun, "
         "mpirun, or JAX_COORDINATOR_ADDRESS set), or no --distributed for one process")


def one_line(error: BaseException) -> str:
  """The gist of an error on one line: for a wrapped traceback, its final line."""
  text = str(error)
  if isinstance(error, AttributeError):  # ConfigDict's unknown field: a repr'd message
    text = "unknown config field " + text.strip("'\"").encode().decode("unicode_escape")
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = [lines[-1].split(": ", 1)[-1]]
  return " ".join(lines)


def _parse_flags(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except (flags.Error, ValueError, AttributeError, KeyError, TypeError, OSError) as e:
    fail(one_line(e))


class _QuietLibraries(logging.Filter):
  """Drops the libraries' routine log lines (orbax logs a dozen per checkpoint, TFDS one per
  dataset read), keeping their warnings and the run's own lines."""

  _CHATTY = ("/orbax/", "/tensorflow_datasets/")

  def filter(self, record: logging.LogRecord) -> bool:
    chatty = any(part in record.pathname for part in self._CHATTY)
    return not chatty or record.levelno >= logging.ERROR


def run_app(main) -> int:
  """`absl.app.run(main)` where bad flags or config values exit with one line, status 2."""
  from absl import app  # pylint: disable=g-import-not-at-top
  logging.getLogger("absl").addFilter(_QuietLibraries())
  app.run(main, flags_parser=_parse_flags)
  return 0


def duration(seconds: float) -> str:
  """Seconds as a short human duration: `45 s`, `12.5 min`, `3.2 h`."""
  if seconds < 120:
    return f"{seconds:.0f} s"
  if seconds < 2 * 3600:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


def progress_line(done: int, total: int, durations: list[float], unit: str = "run",
                  units: str | None = None) -> str:
  """`done/total UNITS, T per UNIT, ETA E`: the mean of `durations` (the items done here and
  timed; items skipped as finished earlier count as done but not in the mean) times the items
  left. Without a timed item yet, only `done/total UNITS`. `units`: the plural (UNIT + s)."""
  line = f"{done}/{total} {units or unit + 's'}"
  if not durations:
    return line
  mean = sum(durations) / len(durations)
  return f"{line}, {duration(mean)} per {unit}, ETA {duration(mean * (total - done))}"


class Progress:
  """Overall progress of `total` items of long work (runs of a sweep, analyses, datasets)."""

  def __init__(self, total: int, unit: str = "run", units: str | None = None):
    self.total, self.unit, self.units = total, unit, units
    self.done, self.durations = 0, []

  def step(self, seconds: float | None = None) -> str:
    """Marks one more item done (`seconds`: its time; None when it was skipped) and returns
    the progress line."""
    self.done += 1
    if seconds is not None:
      self.durations.append(seconds)
    return progress_line(self.done, self.total, self.durations, self.unit, self.units)

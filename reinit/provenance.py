"""What produced a result: versions, code, devices and XLA flags, recorded in every results.json.

`collect()` returns a JSON-serializable dict:

  python         the interpreter's version, e.g. "3.11.7"
  packages       {distribution name: version or None when not installed} for PACKAGES
  code           {"commit": full SHA, "dirty": bool} of the git checkout the `reinit` package is
                 imported from (dirty: `git status --porcelain` lists changed or untracked,
                 not ignored, files); None when it is not imported from a git checkout (an
                 installed wheel) or git is missing
  devices        {"platform", "kind" (device_kind of the first device), "count" (all devices
                 of all processes), "local_count", "process_count"}
  xla_flags      the XLA_FLAGS environment variable in effect ("" when unset)

Kept out of the library core: it imports jax only inside `devices()`, and runs `git` once.
"""

import importlib.metadata
import os
import pathlib
import platform
import subprocess

# Distributions whose versions decide a result (numerics, data, checkpoints). TensorFlow ships
# as `tensorflow` or `tensorflow-cpu`; whichever is installed is recorded.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "orbax-checkpoint", "tensorflow-datasets",
            "tensorflow", "tensorflow-cpu", "reinit")
_GIT_TIMEOUT_S = 10


def package_versions(names=PACKAGES) -> dict[str, str | None]:
  """{name: installed version, or None}."""
  out = {}
  for name in names:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def _git(root: pathlib.Path, *args: str) -> str | None:
  try:
    proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          timeout=_GIT_TIMEOUT_S, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return proc.stdout if proc.returncode == 0 else None


def code_version(package_dir: str | os.PathLike | None = None) -> dict | None:
  """{"commit", "dirty"} of the git checkout whose top level holds `package_dir` (default: the
  imported `reinit` package); None when that folder is not the top of a git checkout's
  `reinit/` (e.g. a wheel installed in site-packages, even inside someone else's repository)."""
  package = pathlib.Path(package_dir or pathlib.Path(__file__).parent).resolve()
  top = _git(package, "rev-parse", "--show-toplevel")
  if top is None or pathlib.Path(top.strip()).resolve() != package.parent:
    return None
  commit = _git(package.parent, "rev-parse", "HEAD")
  status = _git(package.parent, "status", "--porcelain")
  if commit is None or status is None:
    return None
  return {"commit": commit.strip(), "dirty": bool(status.strip())}


def devices() -> dict:
  """The devices jax sees: platform, kind, count (global), local count, process count."""
  import jax  # pylint: disable=g-import-not-at-top
  first = jax.devices()[0]
  return {"platform": first.platform, "kind": first.device_kind, "count": jax.device_count(),
          "local_count": jax.local_device_count(), "process_count": jax.process_count()}


def collect() -> dict:
  """Provenance of a result produced now, by this process (see the module docstring)."""
  return {"python": platform.python_version(), "packages": package_versions(),
          "code": code_version(), "devices": devices(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}

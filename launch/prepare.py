r"""Prepare the benchmark datasets: `python -m launch.prepare --datasets=all|KEY,... --data_dir=DIR`.

  python -m launch.prepare --datasets=all --data_dir=/data/tfds
  python -m launch.prepare --datasets=digits,cifar10 --data_dir=/data/tfds --nodownload

For each dataset (a key of `DATASETS` in reinit/data/registry.py): already prepared in DIR ->
ready; `digits` is built locally from scikit-learn (no download); any other is downloaded and
prepared with TFDS (`download_and_prepare`) when the hosts of its files answer within
`--probe_timeout` seconds. A dataset that cannot be prepared (offline, a moved URL, a changed
file) gets the exact manual steps: `curl` commands that put its files into
DIR/downloads/manual/, where TFDS picks them up (checking their sizes and checksums) when this
command runs again. Ends with a table of which datasets are ready in DIR.

Exit status: 0 when every requested dataset is ready, 1 when some are missing (the table and the
manual steps say which and why), 2 for a bad flag (one line naming it).
"""

import os
import shlex
import socket
import sys
import time
import urllib.parse

from absl import app
from absl import flags

from launch import common
from reinit.data.registry import DATASETS

_DATASETS = flags.DEFINE_list("datasets", None, "`all` or comma-separated keys of "
                              "reinit/data/registry.py DATASETS.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir to prepare the datasets in.")
_DOWNLOAD = flags.DEFINE_bool("download", True, "Download what is missing (--nodownload: only "
                              "report, build digits and print the manual steps).")
_PROBE_TIMEOUT = flags.DEFINE_float("probe_timeout", 5.0, "Seconds to wait for each download "
                                    "host to accept a connection before calling it unreachable.")
flags.mark_flags_as_required(["datasets", "data_dir"])

_LOCAL = ("digits",)  # built from scikit-learn, no download
# Files TFDS's checksum lists name but the builder does not fetch for our config: other
# configs' archives and superseded mirrors (a URL whose file name is not the archive's).
_FILES = {"eurosat/rgb": ("EuroSAT.zip",), "caltech101": ("caltech-101.zip",)}
# TFDS's download URLs of these have moved or their files changed before (TFDS issues): when
# the download fails, the files may have to come from the dataset's homepage.
_TROUBLED = ("caltech101", "caltech_birds2011")


def dataset_keys(value: list[str]) -> list[str]:
  """`--datasets` -> benchmark keys (in DATASETS order for `all`); a bad key exits with 2."""
  keys = list(DATASETS) if value == ["all"] else list(dict.fromkeys(value))
  unknown = [k for k in keys if k not in DATASETS]
  if unknown or not keys:
    common.fail(f"--datasets={','.join(value)} is invalid; accepted: all or comma-separated keys "
                f"of reinit/data/registry.py DATASETS: {', '.join(DATASETS)}")
  return keys


def files_of(builder) -> list[tuple[str, str, int]]:
  """(url, file name, bytes) of the files TFDS downloads for `builder`, one per file name."""
  wanted = _FILES.get(builder.info.full_name.rsplit("/", 1)[0])
  out = {}
  for url, info in sorted((builder.url_infos or {}).items()):
    name = info.filename or os.path.basename(urllib.parse.urlparse(url).path)
    if wanted is not None and name not in wanted:
      continue
    # Mirrors of one file: keep the first, preferring a direct host to Google Drive.
    if name not in out or "drive.google.com" in out[name][0]:
      out[name] = (url, name, int(info.size))
  return list(out.values())


def reachable(host: str, port: int, timeout: float) -> bool:
  """Whether `host:port` accepts a TCP connection within `timeout` seconds."""
  try:
    socket.create_connection((host, port), timeout=timeout).close()
    return True
  except OSError:
    return False


def _host(url: str) -> tuple[str, int]:
  parsed = urllib.parse.urlparse(url)
  return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)


def _size(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024


def manual_steps(key: str, name: str, builder, manual_dir: str) -> str:
  """The commands that prepare `builder` by hand: fetch its files, then run this again."""
  lines = [f"{key} ({name}): put these files into {manual_dir}/ and run this command "
           "again; TFDS checks their sizes and checksums:",
           f"  mkdir -p {shlex.quote(manual_dir)}"]
  for url, name, size in files_of(builder):
    lines.append(f"  curl -L -o {shlex.quote(os.path.join(manual_dir, name))} "
                 f"{shlex.quote(url)}  # {_size(size)}")
  if builder.name in _TROUBLED:
    lines.append(f"  (TFDS's URLs for {builder.name} have moved before: if a URL fails, get the "
                 f"file of that name from {builder.info.homepage})")
  return "\n".join(lines)


def prepare(key: str, data_dir: str, *, download: bool, probe_timeout: float,
            reachable_hosts: dict) -> tuple[bool, str, str | None]:
  """Prepares one dataset. Returns (ready, detail, manual steps or None)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # Also registers the local `digits` builder with TFDS.
  from reinit.data import builders  # pylint: disable=g-import-not-at-top
  name = DATASETS[key].tfds_name
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    return True, "prepared", None
  if key in _LOCAL:
    builders.get_builder(name, data_dir=data_dir)  # builds it
    return True, "built locally (no download)", None
  manual_dir = os.path.join(data_dir, "downloads", "manual")
  steps = manual_steps(key, name, builder, manual_dir)
  files = files_of(builder)
  in_manual = all(os.path.exists(os.path.join(manual_dir, n)) for _, n, _ in files)
  if not download and not in_manual:
    return False, "not prepared (--nodownload)", steps
  if not in_manual:
    hosts = sorted({_host(url) for url, _, _ in files})
    for host in hosts:
      if host not in reachable_hosts:
        reachable_hosts[host] = reachable(*host, probe_timeout)
    down = [h for h, _ in hosts if not reachable_hosts[(h, _)]]
    if down:
      return False, f"not prepared; cannot reach {', '.join(down)} (offline?)", steps
  print(f"{key}: downloading and preparing {builder.name} "
        f"({_size(sum(s for _, _, s in files))} to fetch) ...", flush=True)
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except Exception as e:  # pylint: disable=broad-except
    return False, f"TFDS failed: {common.one_line(e)[:300]}", steps
  return True, "downloaded and prepared", None


def table(rows: list[tuple[str, str, bool, str]]) -> str:
  lines = ["| dataset | TFDS name | ready | detail |", "|---|---|---|---|"]
  lines += [f"| {key} | {name} | {'yes' if ready else 'no'} | {detail} |"
            for key, name, ready, detail in rows]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  keys = dataset_keys(_DATASETS.value)
  if _PROBE_TIMEOUT.value <= 0:
    common.fail(f"--probe_timeout={_PROBE_TIMEOUT.value} is invalid; accepted: seconds > 0")
  data_dir = os.path.abspath(os.path.expanduser(_DATA_DIR.value))
  progress = common.Progress(len(keys), "dataset")
  rows, steps, hosts = [], [], {}
  for key in keys:
    start = time.perf_counter()
    ready, detail, manual = prepare(key, data_dir, download=_DOWNLOAD.value,
                                    probe_timeout=_PROBE_TIMEOUT.value, reachable_hosts=hosts)
    rows.append((key, DATASETS[key].tfds_name, ready, detail))
    if manual:
      steps.append(manual)
    print(f"{key}: {'ready' if ready else 'missing'} ({detail}) "
          f"[{progress.step(time.perf_counter() - start)}]", flush=True)
  if steps:
    print("\nManual steps for the missing datasets:\n\n" + "\n\n".join(steps))
  print(f"\nDatasets in {data_dir}:\n\n{table(rows)}")
  return 0 if all(ready for _, _, ready, _ in rows) else 1


if __name__ == "__main__":
  sys.exit(common.run_app(main))

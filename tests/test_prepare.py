"""launch.prepare: which datasets are ready, manual steps for the others, no hang offline."""

import socket
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from launch import prepare

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _prepare(*args):
  return subprocess.run([sys.executable, "-m", "launch.prepare", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_without_downloads_digits_is_built_and_the_others_get_manual_steps(tmp_path):
  manual = tmp_path / "downloads" / "manual"
  manual.mkdir(parents=True)
  # A file of the right name but not the real archive: TFDS takes it from the manual folder
  # instead of the network, and refuses it by its checksum.
  (manual / "cifar-10-binary.tar.gz").write_bytes(b"not the archive")
  proc = _prepare("--datasets=digits,cifar10,birds", f"--data_dir={tmp_path}", "--nodownload")
  assert proc.returncode == 1, proc.stderr[-3000:]  # some datasets are missing
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
          for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line}
  assert rows["digits"][:2] == ["digits", "yes"]
  assert rows["cifar10"][:2] == ["cifar10", "no"] and "checksum" in rows["cifar10"][2]
  assert rows["birds"][:2] == ["caltech_birds2011", "no"]
  assert (tmp_path / "digits" / "1.0.0" / "dataset_info.json").exists()
  # The manual steps name the files TFDS expects, where it looks for them.
  assert f"curl -L -o {manual}/CUB_200_2011.tgz 'https://data.caltech.edu/" in proc.stdout
  assert f"curl -L -o {manual}/cifar-10-binary.tar.gz" in proc.stdout
  assert "3/3 datasets" in proc.stdout
  # Run again: digits is found prepared.
  again = _prepare("--datasets=digits", f"--data_dir={tmp_path}")
  assert again.returncode == 0 and "| digits | digits | yes | prepared |" in again.stdout


def test_unknown_dataset_is_one_line_exit_2(tmp_path):
  proc = _prepare("--datasets=digits,imagenet", f"--data_dir={tmp_path}")
  assert proc.returncode == 2
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "--datasets=digits,imagenet" in errors[0]
  assert "cifar10" in errors[0] and "colorectal" in errors[0]
  assert not any(tmp_path.iterdir())


def test_reachable_tells_a_listening_port_from_a_closed_one():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    assert prepare.reachable("127.0.0.1", server.getsockname()[1], timeout=2.0)
  with socket.socket() as probe:  # a port nothing listens on: refused at once
    probe.bind(("127.0.0.1", 0))
    closed = probe.getsockname()[1]
  assert not prepare.reachable("127.0.0.1", closed, timeout=2.0)


@pytest.mark.parametrize("name, files", [
    ("eurosat/rgb", ["EuroSAT.zip"]),                      # not the all-bands archive
    ("caltech101", ["caltech-101.zip"]),                   # not the old Google Drive copy
    ("caltech_birds2011", ["CUB_200_2011.tgz", "segmentations.tgz"]),
    ("cifar10", ["cifar-10-binary.tar.gz"]),
])
def test_files_of_a_builder_are_the_archives_it_downloads(tmp_path, name, files):
  found = prepare.files_of(tfds.builder(name, data_dir=str(tmp_path)))
  assert sorted(f for _, f, _ in found) == files
  assert not any("drive.google.com" in url for url, _, _ in found)
  assert all(size > 0 for _, _, size in found)

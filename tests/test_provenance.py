"""Provenance: the versions, code commit, devices and XLA flags that produced a result."""

import os
import pathlib
import platform
import subprocess

import flax
import jax
import optax
import pytest

from reinit import provenance


def _git(root, *args):
  return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t",
                         *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path):
  """A git checkout with a committed `reinit/` package folder."""
  root = tmp_path / "repo"
  (root / "reinit").mkdir(parents=True)
  (root / "reinit" / "__init__.py").write_text("x = 1\n")
  _git(root, "init", "-q")
  _git(root, "add", ".")
  _git(root, "commit", "-q", "-m", "first")
  return root


def test_code_version_of_a_clean_then_dirty_checkout(checkout):
  head = _git(checkout, "rev-parse", "HEAD")
  assert provenance.code_version(checkout / "reinit") == {"commit": head, "dirty": False}
  (checkout / "reinit" / "__init__.py").write_text("x = 2\n")
  assert provenance.code_version(checkout / "reinit") == {"commit": head, "dirty": True}


def test_code_version_of_an_untracked_new_file_is_dirty(checkout):
  (checkout / "reinit" / "new.py").write_text("")
  assert provenance.code_version(checkout / "reinit")["dirty"] is True


def test_no_code_version_outside_a_checkout_or_below_its_top(tmp_path, checkout):
  installed = tmp_path / "site-packages" / "reinit"
  installed.mkdir(parents=True)
  assert provenance.code_version(installed) is None
  # A wheel installed in a virtual environment inside someone's repository: not our commit.
  nested = checkout / "venv" / "site-packages" / "reinit"
  nested.mkdir(parents=True)
  assert provenance.code_version(nested) is None


def test_collect_names_versions_devices_and_flags():
  out = provenance.collect()
  assert out["python"] == platform.python_version()
  assert out["packages"]["jax"] == jax.__version__
  assert out["packages"]["flax"] == flax.__version__
  assert out["packages"]["optax"] == optax.__version__
  assert out["packages"]["jaxlib"] == jax.lib.__version__
  for name in ("orbax-checkpoint", "tensorflow-datasets"):
    assert out["packages"][name]
  assert out["devices"] == {"platform": "cpu", "kind": jax.devices()[0].device_kind,
                            "count": len(jax.devices()), "local_count": len(jax.local_devices()),
                            "process_count": 1}
  assert out["xla_flags"] == os.environ.get("XLA_FLAGS", "")
  # This test runs from the repository's checkout (or a copy without .git: None).
  repo = pathlib.Path(__file__).resolve().parents[1]
  if (repo / ".git").exists():
    assert out["code"]["commit"] == _git(repo, "rev-parse", "HEAD")

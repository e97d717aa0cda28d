"""Packaging: a light core install, the trainer's dependencies in extras, pinned tested versions.

The complete check in a fresh virtual environment (`pip install .` with no extras, then the
accelerator extras resolved) takes minutes and the network to the package index: it is
`.ci/check_install.sh`, run by CI. These tests check the same promises from the built wheel.
"""

import ast
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile

REPO = pathlib.Path(__file__).resolve().parents[1]
CORE = {"jax", "flax", "optax", "numpy"}
# Modules of the `train` extra's distributions (and orbax, which flax installs): the library
# core must work without importing any of them.
TRAINER_MODULES = ("tensorflow", "tensorflow_datasets", "clu", "orbax", "ml_collections",
                   "sklearn", "pandas", "matplotlib", "tensorboard")


def _name(requirement: str) -> str:
  """'etils[epath]>=1.5' -> 'etils'; names compared lower-case with - for _."""
  return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")


def _project() -> dict:
  return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_core_dependencies_are_jax_flax_optax_numpy_and_extras_exist():
  project = _project()
  assert {_name(r) for r in project["dependencies"]} == CORE
  extras = project["optional-dependencies"]
  assert {"train", "test", "cuda12", "tpu"} <= set(extras)
  train = {_name(r) for r in extras["train"]}
  assert {"tensorflow-cpu", "tensorflow-datasets", "orbax-checkpoint", "clu",
          "ml-collections"} <= train
  assert "reinit[train]" in extras["test"]
  assert extras["cuda12"] == ["jax[cuda12]"] and extras["tpu"] == ["jax[tpu]"]


def _pins() -> dict[str, str]:
  pins = {}
  for line in (REPO / "constraints.txt").read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
      name, version = line.split("==")
      pins[_name(name)] = version
  return pins


def test_constraints_pin_every_dependency_and_a_jaxlib_the_xla_flag_knows():
  project = _project()
  requirements = list(project["dependencies"])
  for extra in project["optional-dependencies"].values():
    requirements += extra
  names = {_name(r) for r in requirements} - {"reinit"}
  pins = _pins()
  assert names | {"jaxlib"} <= set(pins), sorted(names | {"jaxlib"} - set(pins))
  assert pins["jax"] == pins["jaxlib"]  # jax pins its jaxlib exactly
  # launch/common.py sets an XLA CPU flag only for these jaxlibs (XLA aborts on unknown flags).
  source = (REPO / "launch" / "common.py").read_text()
  tested = next(ast.literal_eval(node.value) for node in ast.parse(source).body
                if isinstance(node, ast.Assign) and node.targets[0].id == "_TESTED_JAXLIBS")
  assert tuple(int(p) for p in pins["jaxlib"].split(".")[:2]) in tested


def test_wheel_installs_only_reinit_with_py_typed_and_the_core_requirements(tmp_path):
  source = tmp_path / "src"
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, source / name)
  shutil.copytree(REPO / "reinit", source / "reinit",
                  ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copytree(REPO / "configs", source / "configs")  # present, as in a clone: not installed
  shutil.copytree(REPO / "launch", source / "launch")
  proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                         str(tmp_path / "dist"), str(source)], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (wheel,) = (tmp_path / "dist").glob("reinit-*.whl")
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
  assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {
      "reinit"}
  assert "reinit/py.typed" in names and "reinit/transforms.py" in names
  requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines()
              if line.startswith("Requires-Dist:")]
  assert {_name(r) for r in requires if "extra ==" not in r} == CORE
  assert any(r.startswith("tensorflow-cpu") and 'extra == "train"' in r for r in requires)


def test_library_works_without_the_trainer_packages(tmp_path):
  """`import reinit` and the models, with every trainer package made unimportable."""
  code = textwrap.dedent(f"""
      import importlib.abc, sys
      class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in {TRAINER_MODULES!r}:
            raise ImportError("blocked: " + name)
      sys.meta_path.insert(0, Block())
      import jax, jax.numpy as jnp
      import reinit, reinit.models, reinit.methods
      model = reinit.models.SimpleCNN(num_classes=3)
      x = jnp.zeros((1, 8, 8, 1))
      units = reinit.layer_order(model, jax.random.key(0), x, train=False)
      v = model.init(jax.random.key(0), x, train=False)
      w = model.init(jax.random.key(1), x, train=False)
      out = reinit.reinitialize(v, w, reinit.select(v, layers=[units[-1]]))
      assert units[-1] == "head" and (out["params"]["head"]["kernel"]
                                      == w["params"]["head"]["kernel"]).all()
      print("ok")
      """)
  # Run from an empty folder: the repository's configs/ and launch/ are not on the path.
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]

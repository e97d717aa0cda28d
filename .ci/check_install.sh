#!/usr/bin/env bash
# The install promises, checked in a fresh virtual environment (needs the package index; about
# 2-3 minutes on 2 CPU cores, most of it pip unpacking jaxlib):
#   1. `pip install .` (no extras) gives a working `import reinit` without TensorFlow installed,
#      and installs no top-level `configs` or `launch` package;
#   2. the accelerator extras resolve with the tested versions (constraints.txt):
#      `.[cuda12]` and `.[tpu]`, resolved with `pip install --dry-run` (metadata only, nothing
#      installed; a recent pip reads the wheels' metadata without downloading them).
# Usage: .ci/check_install.sh [VENV_DIR]   (default: a temporary folder, removed at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
venv=${1:-$(mktemp -d)/venv}
trap '[ -z "${1:-}" ] && rm -rf "$(dirname "$venv")"' EXIT
start=$SECONDS

python -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
"$venv/bin/python" -m pip install -q "$repo" 2>&1 | grep -v "is ignored" || true
cd "$(dirname "$venv")"  # away from the repository: only what was installed is importable
"$venv/bin/python" - <<'EOF'
import importlib.util, pathlib, sys, sysconfig
import jax, reinit
x = {"w": jax.numpy.ones((2, 3))}
assert float(reinit.shrink_perturb(x, x, shrink=0.5, perturb=0.0)["w"].sum()) == 3.0
site = pathlib.Path(sysconfig.get_paths()["purelib"])
for name in ("tensorflow", "tensorflow_datasets", "clu", "ml_collections", "configs", "launch"):
  assert importlib.util.find_spec(name) is None, f"{name} is installed by `pip install .`"
assert not (site / "configs").exists() and not (site / "launch").exists()
assert (pathlib.Path(reinit.__file__).parent / "py.typed").exists()
assert "tensorflow" not in sys.modules
print(f"core install: ok (reinit {reinit.__version__}, jax {jax.__version__}, no TensorFlow, "
      "no configs/launch packages)")
EOF
echo "fresh core install: $((SECONDS - start)) s"

for extra in cuda12 tpu; do
  t=$SECONDS
  "$venv/bin/python" -m pip install -q --dry-run --ignore-installed -c "$repo/constraints.txt" \
    --report "$(dirname "$venv")/$extra.json" "$repo[$extra]" 2>&1 | grep -v "is ignored" || true
  "$venv/bin/python" - "$(dirname "$venv")/$extra.json" "$extra" <<'EOF'
import json, sys
report, extra = json.load(open(sys.argv[1])), sys.argv[2]
found = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}
wanted = {"cuda12": "jax-cuda12-plugin", "tpu": "libtpu"}[extra]
assert wanted in found, f".[{extra}] does not bring {wanted}: {sorted(found)}"
print(f".[{extra}] resolves: jax {found['jax']}, jaxlib {found['jaxlib']}, "
      f"{wanted} {found[wanted]} ({len(found)} distributions)")
EOF
  echo ".[$extra] resolution: $((SECONDS - t)) s"
done
echo "check_install: all ok in $((SECONDS - start)) s"

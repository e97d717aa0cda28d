#!/usr/bin/env bash
# The GPU check of issue 14 (groups of runs), run once on one GPU, from the repository root:
#
#   pip download --no-deps -d .whl ml_collections==1.1.0 clu==0.0.12  # here, once
#   OUT=/tmp/out bash launch/gpu_check.sh                              # on the GPU host, ~3 min
#
# Needs jax (CUDA), flax, optax, absl, numpy, torch; no TensorFlow or TFDS (the synthetic
# benchmark imports neither: each JAX line has "imported_tf": false).
# Measures, each line of JSON appended to $OUT/gpu.jsonl and printed:
#   1. simple_cnn 32 px, batch 64, one run per program (today's path: a step per host call);
#   2. the same as a group of R=64 runs (`--runs_per_program=64`): aggregate images/s;
#   3. resnet18 32 px bfloat16, a group of R=8: MFU;
#   4. the PyTorch twin of 3: resnet18 bf16 autocast, channels_last, 8 runs one after the
#      other, MFU at the FLOP count RESNET18_FLOPS (else the JAX line's);
#   5. 2 and 3 with XLA's convolutions (grouped ones under vmap) instead of im2col;
#   6. 2 with the runs one after the other (`--over_runs=map`); the twin of 1 (simple_cnn);
#   7. a summary line: the aggregate images/s ratio R=64 / R=1 (issue: >= 20) and both MFUs.
# SMALL=1: tiny sizes and steps, for a dry run on CPU (every command end to end, minutes).
# Each measurement has its own time limit; one that fails or times out writes an error line
# and the next ones still run.
set -uo pipefail

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
JSONL="$OUT/gpu.jsonl"
LOG="$OUT/gpu.log"
: > "$JSONL"
: > "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# The GPU host lacks ml_collections (configs) and clu (the eval step's metrics): pure-Python
# wheels downloaded here (`pip download --no-deps -d .whl ml_collections==1.1.0 clu==0.0.12`)
# are installed into a private folder when missing.
if ! python -c "import ml_collections, clu" 2>/dev/null; then
  deps=/tmp/reinit_gpu_check_deps
  python -m pip install --quiet --no-index --no-deps --target "$deps" "${WHEELS:-.whl}"/*.whl >>"$LOG" 2>&1 \
    || { echo "ml_collections or clu is missing and ${WHEELS:-.whl}/*.whl did not install" >&2; exit 2; }
  export PYTHONPATH="$PYTHONPATH:$deps"
fi

if [[ "${SMALL:-0}" == 1 ]]; then
  CNN="--image_size=8 --batch_size=8 --width=0.25"; RESNET="--image_size=8 --batch_size=4 --width=0.125"
  R_BIG=4; R_RESNET=2; STEPS=2; REPEATS=1; TWIN_STEPS=2; LIMIT=400
else
  CNN="--image_size=32 --batch_size=64"; RESNET="--image_size=32 --batch_size=64"
  R_BIG=64; R_RESNET=8; STEPS=20; REPEATS=3; TWIN_STEPS=20; LIMIT=90
fi

# measure NAME LIMIT_S COMMAND...: the command's last stdout line (JSON), tagged with NAME.
measure() {
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" >>"$LOG"
  local start=$SECONDS line
  line=$(timeout "$limit" "$@" 2>>"$LOG" | tail -n 1)
  local status=$?
  if [[ $status -ne 0 || "${line:0:1}" != "{" ]]; then
    line="{\"error\": \"exit $status after $((SECONDS - start)) s; see gpu.log\"}"
  fi
  line=$(python -c 'import json, sys; d = json.loads(sys.argv[2]); print(json.dumps({"check": sys.argv[1], "wall_s": int(sys.argv[3]), **d}))' \
         "$name" "$line" "$((SECONDS - start))")
  echo "$line" | tee -a "$JSONL"
}

field() {  # field CHECK KEY: the value of KEY in the line of CHECK (empty if none)
  python -c 'import json, sys
for l in open(sys.argv[1]):
  d = json.loads(l)
  if d.get("check") == sys.argv[2] and d.get(sys.argv[3]) is not None: print(d[sys.argv[3]])' \
    "$JSONL" "$1" "$2"
}

python -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1 | tee -a "$LOG"
python -m pip list 2>/dev/null | grep -i -E "^(jax|jaxlib|flax|optax|orbax-checkpoint|torch|numpy) " >>"$LOG"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader >>"$LOG" 2>&1
# In order of what the issue asks, so that a check cut short by the call's time limit is one
# of the optional ones: the two simple_cnn lines of the 20x ratio, the resnet18 group's MFU and
# its PyTorch twin, then the variants that say where the gain comes from.
measure simple_cnn_r1 "$LIMIT" python -m launch.benchmark --model=simple_cnn $CNN \
  --check_methods=none --steps=$((STEPS * 2)) --repeats=$REPEATS
measure simple_cnn_group "$LIMIT" python -m launch.benchmark --model=simple_cnn $CNN \
  --runs_per_program=$R_BIG --steps=$STEPS --repeats=$REPEATS
measure resnet18_group "$((LIMIT * 3 / 2))" python -m launch.benchmark --model=resnet18 $RESNET \
  --compute_dtype=bfloat16 --runs_per_program=$R_RESNET --steps=$STEPS --repeats=$REPEATS
flops=${RESNET18_FLOPS:-$(field resnet18_group train_flops_per_image)}
measure resnet18_torch_twin "$LIMIT" python -m launch.torch_twin --model=resnet18 $RESNET \
  --bf16 --runs=$R_RESNET --steps=$TWIN_STEPS ${flops:+--flops_per_image=$flops}
# XLA's convolutions under vmap (grouped convolutions for cuDNN) against im2col's batched
# matrix products, the default for groups.
measure simple_cnn_group_xla "$LIMIT" python -m launch.benchmark --model=simple_cnn $CNN \
  --conv=xla --runs_per_program=$R_BIG --steps=$STEPS --repeats=$REPEATS
measure resnet18_group_xla "$((LIMIT * 3 / 2))" python -m launch.benchmark --model=resnet18 \
  $RESNET --compute_dtype=bfloat16 --conv=xla --runs_per_program=$R_RESNET --steps=$STEPS \
  --repeats=$REPEATS
# The runs one after the other inside the program.
measure simple_cnn_group_map "$LIMIT" python -m launch.benchmark --model=simple_cnn $CNN \
  --runs_per_program=$R_BIG --over_runs=map --steps=$STEPS --repeats=$REPEATS
flops=${SIMPLE_CNN_FLOPS:-$(field simple_cnn_group train_flops_per_image)}
measure simple_cnn_torch_twin "$LIMIT" python -m launch.torch_twin --model=simple_cnn $CNN \
  --runs=1 --steps=$TWIN_STEPS ${flops:+--flops_per_image=$flops}

# XLA's cost analysis on GPU misses cuDNN's convolutions (custom calls): MFU from the train
# FLOPs per image XLA's CPU backend counts, passed as RESNET18_FLOPS / SIMPLE_CNN_FLOPS.
python - "$JSONL" "${RESNET18_FLOPS:-}" "${SIMPLE_CNN_FLOPS:-}" <<'EOF' | tee -a "$JSONL"
import json, sys
lines = {d["check"]: d for d in map(json.loads, open(sys.argv[1]))}
resnet_flops, cnn_flops = (float(f) if f else None for f in sys.argv[2:4])


def mfu(check, flops, peak):
  rate = get(check, "aggregate_images_per_s") or get(check, "images_per_s") or get(
      check, "train_images_per_s")
  return round(rate * flops / peak, 4) if rate and flops else None


get = lambda check, key: lines.get(check, {}).get(key)


def ratio(check, key, denominator):
  value = get(check, key)
  return round(value / denominator, 2) if value and denominator else None


one, group = get("simple_cnn_r1", "train_images_per_s"), get("simple_cnn_group", "aggregate_images_per_s")
print(json.dumps({
    "check": "summary",
    "simple_cnn_runs": get("simple_cnn_group", "runs_per_program"),
    "simple_cnn_aggregate_over_r1": round(group / one, 2) if one and group else None,
    "simple_cnn_map_aggregate_over_r1": (
        round(get("simple_cnn_group_map", "aggregate_images_per_s") / one, 2)
        if one and get("simple_cnn_group_map", "aggregate_images_per_s") else None),
    "resnet18_group_mfu": get("resnet18_group", "mfu"),
    "resnet18_torch_twin_mfu": get("resnet18_torch_twin", "mfu"),
    "resnet18_group_over_torch_images_per_s": (
        round(get("resnet18_group", "aggregate_images_per_s") / get("resnet18_torch_twin", "images_per_s"), 2)
        if get("resnet18_group", "aggregate_images_per_s") and get("resnet18_torch_twin", "images_per_s") else None),
    "simple_cnn_xla_aggregate_over_r1": ratio("simple_cnn_group_xla", "aggregate_images_per_s", one),
    "resnet18_xla_over_im2col": ratio("resnet18_group_xla", "aggregate_images_per_s",
                                      get("resnet18_group", "aggregate_images_per_s")),
    # H100 dense peaks: 989 TFLOP/s bf16, 494 TF32 (float32 at JAX's default precision).
    "mfu_from_cpu_flops": {
        "resnet18_group": mfu("resnet18_group", resnet_flops, 989e12),
        "resnet18_group_xla": mfu("resnet18_group_xla", resnet_flops, 989e12),
        "resnet18_torch_twin": mfu("resnet18_torch_twin", resnet_flops, 989e12),
        "simple_cnn_r1": mfu("simple_cnn_r1", cnn_flops, 494e12),
        "simple_cnn_group": mfu("simple_cnn_group", cnn_flops, 494e12)},
    "errors": [c for c, d in lines.items() if "error" in d],
}))
EOF

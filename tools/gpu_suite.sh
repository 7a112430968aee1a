#!/usr/bin/env bash
# The GPU rows of bench/README.md in one run on a CUDA machine, each under its own time limit.
#
#   bash tools/gpu_suite.sh PREPARED OUT [ROW ...]
#
# PREPARED: what tools/gpu_prepare.sh wrote (wheels/ to install, models/<name>/ with or
# without weights; missing weights are drawn at random by tools/random_model.py).
# OUT: receives suite.log (everything the rows print) and results.jsonl (each finished
# row's JSON object, with "row" added). ROWs: which to run, in order; default all:
#   mpnet_profile  MPNet-base bf16 256 x 128 full length: ms/step, MFU, where the time goes
#   mpnet_cublas   the same with XLA's Triton GEMMs off (cuBLAS for every matmul)
#   attention      fused vs XLA attention alone (tools/attention.py)
#   attention_sweep the fused kernels' tilings (tools/attention.py --sweep; each tiling's
#                  time is in suite.log as soon as it is measured)
#   mpnet_vs_st    MPNet-base bf16 256 Debian pairs, packed, vs sentence-transformers
#   pipeline       input pipeline alone at batch 1024 with 0, 4, 8, 12 workers
#   minilm_profile MiniLM-L6 bf16 256 Debian pairs, packed: where the time goes
#   attention_ncu  Nsight Compute's speed-of-light and compute/memory sections of the two
#                  Pallas attention kernels (output in suite.log; skipped without ncu)
# SUITE_SECONDS (default 540) bounds the whole run: a row gets what is left if that is
# less than its own limit, and is skipped under 30 s. SUITE_QUICK=1 shrinks every shape
# (a smoke run on a CPU).
set -u
cd "$(dirname "$0")/.."
prepared=$1 out=$2
shift 2
rows=${*:-mpnet_profile attention_sweep mpnet_cublas attention mpnet_vs_st pipeline \
  minilm_profile attention_ncu}
budget=${SUITE_SECONDS:-540}
mkdir -p "$out"
log=$out/suite.log
results=$out/results.jsonl
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TOKENIZERS_PARALLELISM=false

if compgen -G "$prepared/wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/embeddings-site "$prepared"/wheels/*.whl >>"$log" 2>&1 || {
    echo "installing $prepared/wheels failed: see $log"
    exit 1
  }
  export PYTHONPATH=/tmp/embeddings-site${PYTHONPATH:+:$PYTHONPATH}
fi
mpnet=$prepared/models/all-mpnet-base-v2
minilm=$prepared/models/all-MiniLM-L6-v2
for model in "$mpnet" "$minilm"; do
  [ -f "$model/model.safetensors" ] && continue
  python3 tools/random_model.py "$model" "$model" >>"$log" 2>&1 || {
    echo "random weights for $model failed: see $log"
    exit 1
  }
done

if [ "${SUITE_QUICK:-0}" = 1 ]; then
  big="--batch_size 8 --max_length 16 --steps 2 --warmup 1"
  attention="--batch_size 4 --length 16 --heads 2 --head_dim 16 --steps 2 --warmup 1"
  sweep="--sweep_max 2"
  pipeline="--batch_size 64 --num_batches 2 --workers 0,2"
else
  big="--batch_size 256 --max_length 128 --steps 10 --warmup 3"
  attention=""
  sweep="--steps 10 --warmup 2"
  pipeline="--batch_size 1024 --num_batches 20 --workers 0,4,8,12"
fi

row() { # row NAME LIMIT COMMAND...: runs COMMAND, keeps its output and its last-line JSON
  local name=$1 limit=$2
  shift 2
  local left=$((budget - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 30 ]; then
    echo "--- $name: skipped, ${left} s of the suite left" | tee -a "$log"
    return
  fi
  echo "--- $name (limit ${limit} s): $*" >>"$log"
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/.row" 2>>"$log"
  local rc=$?
  cat "$out/.row" >>"$log"
  local last
  last=$(tail -n 1 "$out/.row")
  rm -f "$out/.row"
  if [ "$rc" = 0 ] && [ "${last:0:1}" = "{" ]; then
    python3 -c 'import json, sys; print(json.dumps({"row": sys.argv[1], **json.loads(sys.argv[2])}))' \
      "$name" "$last" >>"$results"
  fi
  echo "--- $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
}

for name in $rows; do
  case $name in
  mpnet_profile)
    row "$name" 150 python3 tools/step_profile.py --model "$mpnet" --dtype bfloat16 \
      --full_length --trace_steps 3 --top 25 $big --json ;;
  mpnet_cublas)
    row "$name" 100 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" \
      python3 tools/step_profile.py --model "$mpnet" --dtype bfloat16 --full_length \
      --trace_steps 2 --top 10 $big --json ;;
  attention)
    row "$name" 60 python3 tools/attention.py $attention --json ;;
  attention_sweep)
    row "$name" 150 python3 tools/attention.py --sweep $attention $sweep --json ;;
  mpnet_vs_st)
    row "$name" 160 python3 bench/step.py --model "$mpnet" --dtype bfloat16 $big --json ;;
  pipeline)
    row "$name" 90 python3 bench/input_pipeline.py $pipeline --json ;;
  minilm_profile)
    row "$name" 80 python3 tools/step_profile.py --model "$minilm" --dtype bfloat16 \
      --trace_steps 3 --top 15 $big --json ;;
  attention_ncu)
    if command -v ncu >/dev/null; then
      row "$name" 120 ncu --target-processes all --kernel-name regex:attention \
        --launch-count 2 --section SpeedOfLight --section ComputeWorkloadAnalysis \
        --section MemoryWorkloadAnalysis python3 tools/attention.py $attention --steps 1 --warmup 0
    else
      echo "--- $name: skipped, no ncu on this machine" | tee -a "$log"
    fi ;;
  *) echo "--- unknown row $name" | tee -a "$log" ;;
  esac
done
# One line per finished row, for the reply's output tail.
[ -f "$results" ] && python3 - "$results" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    keys = ("step_seconds", "pairs_per_second", "reference_pairs_per_second", "speedup", "mfu",
            "traced_ms_per_step", "train_speedup", "default_forward_ms", "best_forward_ms",
            "default_train_ms", "best_train_ms")
    summary = {k: round(r[k], 4) for k in keys if isinstance(r.get(k), (int, float))}
    for mode in r.get("results", []) if isinstance(r.get("results"), list) else []:
        summary[f"{mode['padding']}, {mode['workers']} workers"] = round(mode["pairs_per_second"])
    if isinstance(r.get("best"), dict):
        summary["best tiling"] = r["best"]
    print(r["row"], summary)
PY

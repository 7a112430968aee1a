#!/usr/bin/env bash
# Gathers, where PyPI is reachable, what tools/gpu_suite.sh needs on a CUDA machine that
# cannot download anything: wheels of our dependencies that such an image may lack, and the
# skeletons (config, tokenizer, pooling; no weights) of all-mpnet-base-v2 and
# all-MiniLM-L6-v2, small enough to carry (~6 MB). The suite draws random weights there.
#
#   bash tools/gpu_prepare.sh [DIR] [PYTHON]      # defaults: .gpu (git-ignored), 3.12
#
# PYTHON is the CUDA machine's Python version (the wheels are built for it).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.gpu}
python_version=${2:-3.12}
pin() { grep -E "^$1==" requirements.txt | cut -d' ' -f1; }
mkdir -p "$dir/wheels" "$dir/models"
python3 -m pip download -q --no-deps --only-binary=:all: \
  --python-version "$python_version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$dir/wheels" \
  "$(pin ml-collections)" "$(pin grain)" array-record==0.8.6 portpicker==1.6.0
python3 - "$dir/models" <<'PY'
import pathlib, sys, tempfile
sys.path.insert(0, ".")
from bench import parity
from tools import random_model
models = pathlib.Path(sys.argv[1])
cache = pathlib.Path(tempfile.gettempdir()) / "embeddings-bench-models"  # ~440 MB, not carried
for name, find in parity.MODELS.values():
    random_model.build(find(cache), models / name, weights=False, seed=0)
PY
du -sh "$dir"/*

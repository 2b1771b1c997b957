#!/usr/bin/env bash
# Regenerate common/lorm_manifest_pb2.py from proto/lorm_manifest.proto with grpcio-tools (never hand-edit it).
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-.venv/bin/python}" -m grpc_tools.protoc -Iproto --python_out=common proto/lorm_manifest.proto

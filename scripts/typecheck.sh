#!/usr/bin/env bash
# firmware/ against the MicroPython ESP32 stubs (their own typeshed), host code against CPython's.
set -euo pipefail
cd "$(dirname "$0")/.."
MYPYPATH=.stubs/esp32 .venv/bin/mypy --custom-typeshed-dir .stubs/esp32 \
  --python-version 3.11 --no-incremental --ignore-missing-imports --explicit-package-bases \
  --config-file /dev/null --follow-imports silent firmware
.venv/bin/mypy agent tools

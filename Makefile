# The two commands of the README, and the pieces they are made of.
.PHONY: setup demo test test-fw typecheck compile bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/stationctl demo $(ARGS)

# the browser tests need Debian's chromium and chromium-driver: the test set-up installs them
test: export WITH_BROWSER = 1
test: setup compile typecheck
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

# Every firmware file must compile with mpy-cross (rejects syntax MicroPython lacks).
compile: setup
	@bash scripts/compile_firmware.sh

# Two separate runs: firmware/ against the ESP32 stubs, host code against CPython.
typecheck: setup
	@bash scripts/typecheck.sh

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; .venv/bin/python $$b || exit 1; done

clean:
	rm -rf .venv .stubs .pytest_cache .mypy_cache

# The two commands of the README, and the pieces they are made of.
.PHONY: setup demo test lint typecheck compile bench heap32 chaos soak kill-soak ota-soak ocpp-soak fuzz clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/stationctl demo $(ARGS)

# the browser tests need Debian's chromium and chromium-driver: the test set-up installs them
test: export WITH_BROWSER = 1
test: setup lint compile typecheck
	.venv/bin/python -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

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

# The firmware's heap on a 32-bit MicroPython from npm (the WebAssembly port under node; `npm ci`
# into bench/heap32/node_modules on the first run) beside the unix port: import, 1/8/16 slots,
# full window, outbox drain, 10,000 cycles (bench/bench_heap32.py; figures in bench/heap32/last.json)
heap32: setup
	.venv/bin/python bench/bench_heap32.py $(ARGS)

# 50 stations for a simulated day under broker restarts, agent SIGKILLs, power cuts and bus
# faults; the books must balance (bench/chaos.py). Outside the default test run: ~20 minutes.
chaos: setup
	.venv/bin/python bench/chaos.py $(ARGS)

# 2 million 8-slot messages from 100 stations through Mosquitto into `stationctl agent`:
# RSS, metering state, restarts, throughput, latency (bench/soak.py; figures only, ~15 min
# with the first run's signing; ARGS=--quick for ~100k messages)
soak: setup
	.venv/bin/python bench/soak.py $(ARGS)

# tests/test_agent_kill.py's long variant: 60 SIGKILLs, 8 stations, a longer stream
kill-soak: setup
	STATIONCTL_KILL_SOAK=1 .venv/bin/python -m pytest -q -s tests/test_agent_kill.py $(PYTEST_ARGS)

# tests/test_ota.py's long variants: 20 power cuts through an update, an 8-station canary rollout
ota-soak: setup
	OTA_SOAK=1 .venv/bin/python -m pytest -q -s tests/test_ota.py -k "power_cuts or canary" $(PYTEST_ARGS)

# 100 simulated OCPP chargers (half 1.6J, half 2.0.1) through random sessions for 10
# simulated hours into `stationctl agent`: every connector's credited energy against its
# register, sessions against transactions, verify (bench/ocpp_soak.py; ~2 min)
ocpp-soak: setup
	.venv/bin/python bench/ocpp_soak.py $(ARGS)

# Every external parser fuzzed, 100,000 cases each under a per-case time limit, the firmware's
# also replayed on the MicroPython unix port (bench/fuzz.py; findings in bench/fuzz_findings/,
# exit 1 on any). Outside the default test run (tests/test_fuzz_quick.py keeps it working).
fuzz: setup
	.venv/bin/python bench/fuzz.py $(ARGS)

clean:
	rm -rf .venv .stubs .pytest_cache .mypy_cache

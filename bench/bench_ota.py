"""The time to push a firmware update of 100 KB over MQTT on loopback (firmware/ota.py,
stationctl/ota.py): one station on the MicroPython unix port, a real Mosquitto, the rig.

Printed: the version's size and chunks, the time from the manifest to `staged` (download,
every chunk's MAC, every file's hash read back from flash), to the trial's first boot, and to
`confirmed` (minus the configured healthy window), over `--runs` pushes.

    .venv/bin/python bench/bench_ota.py [--runs 3] [--kb 100]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tools.mosquitto import Mosquitto  # noqa: E402
from tools.ota import CHUNK, Pusher  # noqa: E402
from tools.ota_testbed import (  # noqa: E402
    EventWatcher,
    SupervisedStation,
    build_variant,
    ota_config,
)
from tools.rig.rig import Rig  # noqa: E402

KEY = bytes(range(32))
SID = "KH-BEN-0001"


def padded(vdir: pathlib.Path, kb: int) -> int:
    """Bring the version folder to kb KB with one more file of random bytes; returns bytes."""
    man = json.loads((vdir / "manifest.json").read_text())
    total = sum(e[1] for e in man["files"])
    pad = max(0, kb * 1024 - total)
    if pad:
        data = os.urandom(pad)
        (vdir / "files" / "pad.bin").write_bytes(data)
        man["files"].append(["pad.bin", pad, hashlib.sha256(data).hexdigest()])
        (vdir / "manifest.json").write_text(json.dumps(man))
    return total + pad


def push_into(p: Pusher, res: dict[str, object]) -> None:
    res.update(p.push([SID], 120))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kb", type=int, default=100)
    args = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-ota-"))
    broker = Mosquitto(work / "mq", insecure=True)
    broker.start()
    staged: list[float] = []
    confirmed: list[float] = []
    downloads: list[float] = []
    try:
        with Rig(slots=2, seed=3, workdir=work / "rig") as rig:
            cfg = ota_config(SID, rig, broker.port, KEY.hex())
            st = SupervisedStation(work / "flash", cfg, heap="256k")
            ew = EventWatcher(broker.port, {SID: (1, KEY)})
            st.run_supervised()
            st.wait_for(lambda: SID in ew.last_tel, 30, "first telemetry")
            rig.insert(1, pack="72V", power_w=1200, capacity_wh=80, soc=0.2)
            size = 0
            for run in range(args.runs):
                vdir = build_variant("good", f"9.{run}.0", work)
                size = padded(vdir, args.kb)
                n0 = len(ew.of(SID, "ota"))
                p = Pusher(vdir, {SID: (1, KEY)}, "127.0.0.1", broker.port, confirm_s=1, trial_s=60)
                t0 = time.monotonic()
                t_staged = None
                try:
                    res: dict[str, object] = {}
                    th = threading.Thread(target=push_into, args=(p, res))
                    th.start()
                    while th.is_alive():
                        if t_staged is None and any(
                            e["phase"] == "staged" for e in ew.of(SID, "ota")[n0:]
                        ):
                            t_staged = time.monotonic() - t0
                        time.sleep(0.01)
                    th.join()
                finally:
                    p.close()
                t = res[SID]
                assert t.outcome == "confirmed", t  # type: ignore[attr-defined]
                took = t.t_end - t.t0  # type: ignore[attr-defined]
                chunks = t.chunks  # type: ignore[attr-defined]
                dl = t.t_last_chunk - t.t0  # type: ignore[attr-defined]
                downloads.append(dl)
                print(
                    f"run {run + 1}: {size} bytes, {chunks} chunks of ≤ {CHUNK}: last chunk "
                    f"served after {dl:.2f} s, staged "
                    f"(the event seen) after {t_staged:.2f} s, confirmed after {took:.2f} s "
                    f"(1 s of it the healthy window)"
                )
                if t_staged is not None:
                    staged.append(t_staged)
                confirmed.append(took)
            st.halt()
            ew.close()
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"bench_ota: {args.kb} KB over MQTT on loopback, median of {len(confirmed)}: "
        f"manifest -> last chunk {statistics.median(downloads):.2f} s "
        f"({args.kb / statistics.median(downloads):.0f} KB/s), "
        f"-> staged (after the reboot into it) {statistics.median(staged):.2f} s, "
        f"-> confirmed {statistics.median(confirmed):.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

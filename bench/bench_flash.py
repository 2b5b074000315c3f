"""Provisioning figures on a virtual board (the MicroPython unix port's REPL on a pty, the rig,
a private Mosquitto, a SQLite agent database): time per stage for a fresh board and for a
re-flash of the same station (unchanged files skipped), copy throughput through the raw
REPL, the self-test's time and the heap it leaves at 100k (about an ESP32's without PSRAM).

Such a board needs the firmware as a ROMFS image (docs/hardware.md; as .mpy files on the heap
it no longer fits): the virtual board has a 128 KiB romfs partition, which the unix port
emulates with a bytearray on its heap, and writing the image there takes more heap again
(at 256k the write failed). So the board runs at 320k, and the free heap a 100k board would
have is reckoned as what the self-test reports less the 220k above 100k, the partition's
bytearray put back.

A pty carries bytes at memory speed: on a real board the copy is bound by the UART (115200
baud ~ 11 KB/s before the raw-REPL overhead), so scale the copy figure, not the others.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from agent.store import Store  # noqa: E402
from tools.flash import broker, passwd  # noqa: E402
from tools.flash.provision import Request, provision  # noqa: E402
from tools.flash.virtual import UnixBoard  # noqa: E402
from tools.mosquitto import Mosquitto  # noqa: E402
from tools.rig.rig import Rig  # noqa: E402

RUNS = 3
ROMFS_PART = 128 * 1024  # partitions-4MiB-romfs.csv: romfs 0x20000
HEAP_K = 320  # 100k, the emulated partition's bytearray, its writes


def main() -> None:
    w = pathlib.Path(tempfile.mkdtemp(prefix="bench-flash-"))
    pw = w / "passwd"
    passwd.set_password(pw, "agent", "x")
    db = f"sqlite:///{w / 'agent.db'}"
    Store(db).close()
    with (
        Mosquitto(w / "m", password_file=str(pw), acl_file=str(broker.ACL)) as m,
        Rig(slots=8, seed=1, workdir=w / "rig") as rig,
    ):
        for s in (1, 4, 7):
            rig.insert(s, pack="72V", power_w=1000, capacity_wh=20, soc=0.3)
        site = {
            "broker": {"host": "127.0.0.1", "port": m.port},
            "net": {"kind": "host"},
            "slots": 8,
            "ntp": "host",
            "charger": {"uart": rig.charger_path},
            "bus": {"uart": rig.bus_path, "timeout_ms": 150},
        }
        rows: dict[str, list[dict[str, float]]] = {"fresh": [], "reflash": []}
        totals: dict[str, list[float]] = {"fresh": [], "reflash": []}
        extra: list[dict[str, object]] = []
        for i in range(RUNS):
            sid = f"KH-BEN-{i:04d}"
            with UnixBoard(w / f"flash{i}", heap=f"{HEAP_K}k", romfs=ROMFS_PART) as board:
                for kind in ("fresh", "reflash"):
                    req = Request(
                        sid=sid,
                        port=board.port,
                        chip="unix",
                        agent_db=db,
                        site=site,
                        broker_passwd=str(pw),
                        broker_reload=f"kill -HUP {m.proc.pid}",
                        reports=str(w / "reports"),
                    )
                    t0 = time.monotonic()
                    out = provision(req)
                    totals[kind].append(time.monotonic() - t0)
                    if not out.ok:
                        raise SystemExit(f"{kind}: {out.error}")
                    rows[kind].append(out.report["stages"])
                    if kind == "fresh":
                        fw = out.report["firmware"]
                        extra.append(
                            {
                                "bytes": fw["bytes"],
                                "copy_s": out.report["stages"]["copy"],
                                "selftest_ms": out.report["selftest"]["ms"],
                                "heap_free": out.report["selftest"].get("heap_free"),
                            }
                        )
    print(
        f"provisioning one board, median of {RUNS} (unix port REPL on a pty, heap {HEAP_K}k for a 100k board, "
        f"ROMFS {ROMFS_PART // 1024} KiB, 8 slots):"
    )
    for kind in ("fresh", "reflash"):
        stages = rows[kind][0].keys()
        med = {s: statistics.median(r.get(s, 0.0) for r in rows[kind]) for s in stages}
        parts = ", ".join(f"{s} {v * 1000:.0f}" for s, v in med.items() if v >= 0.001)
        print(f"  {kind:8} total {statistics.median(totals[kind]):.2f} s; stages ms: {parts}")
    b = statistics.median(int(str(e["bytes"])) for e in extra)
    c = statistics.median(float(str(e["copy_s"])) for e in extra)
    from tools.flash import plan
    from tools.flash.board import CHUNK

    files = plan.firmware_files(None)
    # what crosses the line: each chunk as base64 in a `_w(_d('...'))` call, plus raw-paste framing;
    # mpremote's own fs cp sends 256-byte chunks as bytes literals
    wire = sum(
        len(d[i : i + CHUNK]) * 4 // 3 + 16 for d in files.values() for i in range(0, len(d), CHUNK)
    )
    lit = sum(len(repr(d[i : i + 256])) + 8 for d in files.values() for i in range(0, len(d), 256))
    print(
        f"  firmware {b} bytes ({wire} bytes on the line as base64, x{wire / b:.2f}; mpremote's "
        f"bytes literals would be {lit}, x{lit / b:.2f}); copy "
        f"stage {c:.2f} s -> {b / c / 1024:.0f} KiB/s through the raw REPL on a pty; a real UART at "
        f"115200 baud (11.5 KB/s) needs ~{wire / 11520:.0f} s for it"
    )
    free = statistics.median(int(str(e["heap_free"])) for e in extra)
    print(
        f"  self-test on the board: {statistics.median(int(str(e['selftest_ms'])) for e in extra)} ms, "
        f"heap left {free} bytes of {HEAP_K}k, ~{free - (HEAP_K - 100) * 1024 + ROMFS_PART} "
        "on a 100k board"
    )
    print(
        json.dumps(
            {
                "fresh_s": round(statistics.median(totals["fresh"]), 2),
                "reflash_s": round(statistics.median(totals["reflash"]), 2),
            }
        )
    )


if __name__ == "__main__":
    main()

"""Soak: millions of 8-slot telemetry messages from a fleet through Mosquitto into
`stationctl agent` (a process, as deployed), and what stays flat.

Prints, with the message count each figure was taken at (messages committed in raw):
- the agent's RSS (VmRSS of its process) at 10^4, 10^5, 10^6 and 2×10^6 messages, and
  after each restart's warm-up (target: flat within 20 % after warm-up);
- the metering state per station in bytes (`ledger_state` blobs, all views; and the
  `ledger_checkpoint` snapshots beside it);
- restart-to-ready (SIGTERM, start again, until the log says "subscribed to") at 10^5 and
  at the end, and SIGTERM-to-exit;
- throughput on a backlog (published while the agent is down, drained from its start),
  and the same backlog drained in the same run by two bare subscribers that only count
  (bench/bench_ingest.py's): one of the agent's own MQTT client (`bare_own`) and one of
  paho (`bare_drain`, the client of the issue's own figures): the two ratios;
- throughput of the live phases (publisher far faster than the agent, 50k in flight);
- p99 latency publish → committed (the row visible in the database, polled every 2 ms)
  at 5,000 msg/s paced.

Figures only: nothing is asserted. The publisher is not measured: every PUBLISH frame
(QoS 1, packet id fixed) is generated and signed beforehand, in parallel, and cached in
/tmp/stationctl-soak/; publishing is `sendall` of file slices on one socket, PUBACKs only
counted. The agent runs on core 0; Mosquitto, the publisher and this script on core 1.
The broker: the standard test configuration (tools/mosquitto.py) with an unbounded queue
(`max_queued_messages 0`) and no persistence file (it is never restarted here).

    .venv/bin/python bench/soak.py [--messages 2000000] [--stations 100] [--slots 8]
        [--quick] [--sync full|normal] [--keep]
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import mmap
import multiprocessing
import os
import pathlib
import shutil
import signal
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

from agent.keys import KeyStore  # noqa: E402
from agent.sources.mqtt_codec import connect as mqtt_connect  # noqa: E402
from tests.agent_helpers import AgentProcess, Station, key_for  # noqa: E402
from tools.machine import warn_if_busy  # noqa: E402
from tools.mosquitto import Mosquitto  # noqa: E402

AGENT_CPU = {0}
OTHER_CPU = {1} if (os.cpu_count() or 1) > 1 else {0}
CACHE = pathlib.Path(tempfile.gettempdir()) / "stationctl-soak"
WINDOW = 50_000  # most messages published and not yet committed (live phases)
RATE = 5000


def sid(j: int) -> str:
    return f"KH-SOK-{j:04d}"


def pin(pid: int, cpus: set[int]) -> None:
    try:
        os.sched_setaffinity(pid, cpus)
    except OSError:
        pass


# ---- the messages: PUBLISH frames, generated once ------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def frame(topic: str, payload: bytes, pid: int) -> bytes:
    """PUBLISH, QoS 1."""
    t = topic.encode()
    body = len(t).to_bytes(2, "big") + t + pid.to_bytes(2, "big") + payload
    return b"\x32" + _varint(len(body)) + body


def message(stations: int, slots: int, i: int) -> tuple[str, bytes]:
    """Message i of the stream: station i % stations, its (i // stations)th telemetry,
    charging every slot at 1.5 kW, 10 s apart (Station's state set directly, equal to
    i // stations + 1 calls of advance(10_000, 1500))."""
    st = Station(sid(i % stations), slots=slots)
    k = i // stations
    st.seq = k
    st.up = 1000 + (k + 1) * 10_000
    st.e_mwh = [(k + 1) * (1500 * 10_000 // 3600)] * slots
    st.e_wh = 1_000_000 + (k + 1) * (slots * 1500 * 10_000 // 3_600_000)
    kind, payload = st.telemetry()
    return st.topic(kind), payload


def _block(a: tuple[int, int, int, int]) -> tuple[bytes, list[int]]:
    stations, slots, lo, hi = a
    out = bytearray()
    lens = []
    for i in range(lo, hi):
        f = frame(*message(stations, slots, i), i % 65535 + 1)
        out += f
        lens.append(len(f))
    return bytes(out), lens


def frames(n: int, stations: int, slots: int) -> tuple[pathlib.Path, array.array[int]]:
    """The n frames in a file (cached) and their offsets (n + 1)."""
    CACHE.mkdir(exist_ok=True)
    base = CACHE / f"frames-{n}-{stations}-{slots}"
    data, idx = base.with_suffix(".bin"), base.with_suffix(".idx")
    offs: array.array[int] = array.array("Q")
    if data.exists() and idx.exists():
        offs.frombytes(idx.read_bytes())
        return data, offs
    # the direct state equals the sequential one
    st = Station(sid(1), slots=slots)
    for k in range(3):
        st.advance(10_000, 1500)
        assert st.telemetry()[1] == message(stations, slots, 1 + k * stations)[1]
    t0 = time.perf_counter()
    step = 20_000
    blocks = [(stations, slots, lo, min(n, lo + step)) for lo in range(0, n, step)]
    offs.append(0)
    tmp = data.with_suffix(".part")
    with tmp.open("wb") as f, multiprocessing.Pool(os.cpu_count() or 1) as pool:
        for buf, lens in pool.imap(_block, blocks):
            f.write(buf)
            for x in lens:
                offs.append(offs[-1] + x)
    tmp.rename(data)
    idx.write_bytes(offs.tobytes())
    print(f"generated and signed {n:,} frames in {time.perf_counter() - t0:.0f}s ({data})")
    return data, offs


class RawPublisher:
    """One MQTT connection that writes pre-built QoS 1 PUBLISH frames and counts the
    PUBACKs (four bytes each) on a thread."""

    def __init__(self, port: int, data: pathlib.Path, offs: array.array[int]) -> None:
        self.f = data.open("rb")
        self.mm = mmap.mmap(self.f.fileno(), 0, access=mmap.ACCESS_READ)
        self.offs = offs
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(mqtt_connect("soak-pub", keepalive=0))
        ack = b""
        while len(ack) < 4:
            ack += self.sock.recv(4 - len(ack))
        if ack != b"\x20\x02\x00\x00":
            raise RuntimeError(f"CONNACK {ack!r}")
        self.sent = 0  # frames written
        self._ack_bytes = 0
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        while True:
            try:
                b = self.sock.recv(1 << 16)
            except OSError:
                return
            if not b:
                return
            self._ack_bytes += len(b)

    @property
    def acked(self) -> int:
        return self._ack_bytes // 4

    def send(self, lo: int, hi: int, committed: Any = None, chunk: int = 2000) -> None:
        """Frames lo..hi as fast as the socket takes them; with `committed` (a function),
        never more than WINDOW ahead of it."""
        i = lo
        while i < hi:
            j = min(hi, i + chunk)
            self.sock.sendall(self.mm[self.offs[i] : self.offs[j]])
            self.sent += j - i
            i = j
            while self.sent - self.acked > 60_000:  # packet ids are reused past 65,535
                time.sleep(0.001)
            if committed is not None:
                while i - committed() > WINDOW:
                    time.sleep(0.005)

    def paced(self, lo: int, hi: int, rate: int) -> list[float]:
        """Frames lo..hi at `rate` per second; the wall time just before each write."""
        times = []
        t0 = time.perf_counter()
        w0 = time.time() - t0
        step = 1.0 / rate
        for i in range(lo, hi):
            due = t0 + (i - lo) * step
            d = due - time.perf_counter()
            if d > 0.0005:
                time.sleep(d)
            times.append(w0 + time.perf_counter())
            self.sock.sendall(self.mm[self.offs[i] : self.offs[i + 1]])
            self.sent += 1
        return times

    def wait_acked(self, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while self.acked < self.sent:
            if time.monotonic() > end:
                raise TimeoutError(f"broker acked {self.acked} of {self.sent}")
            time.sleep(0.005)

    def close(self) -> None:
        self.sock.sendall(b"\xe0\x00")
        self.sock.close()
        self.mm.close()
        self.f.close()


# ---- the agent -----------------------------------------------------------------------------


class Agent(AgentProcess):
    """`stationctl agent` with the defaults of agent/config.example.toml but the database's
    synchronous mode (default full)."""

    def __init__(self, tmp: pathlib.Path, db: pathlib.Path, port: int, sync: str) -> None:
        super().__init__(tmp, f"sqlite:///{db}", port, client_id="soak-agent")
        self.cfg.write_text(
            f'[db]\nurl = "sqlite:///{db}"\nsynchronous = "{sync}"\n'
            f'[broker]\nport = {port}\nclient_id = "soak-agent"\n'
            f"[health]\nport = {self.health_port}\n"
        )
        self.db = db
        self._con: sqlite3.Connection | None = None

    def start_ready(self) -> float:
        """Start; seconds until the log says it is subscribed."""
        t0 = time.monotonic()
        self.start()
        pin(self.proc.pid, AGENT_CPU)
        self.wait_log("subscribed to", timeout=600)
        return time.monotonic() - t0

    def startup_lines(self) -> str:
        """What this start logged about resuming metering (replay, rebuilt stations)."""
        keep = ("replayed", "metered", "health on")
        lines = [ln for ln in self.log_text().splitlines() if any(k in ln for k in keep)]
        return "; ".join(ln.split(": ", 1)[-1].strip() for ln in lines)

    def rss_mb(self) -> float:
        for line in pathlib.Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def committed(self) -> int:
        """Rows in raw (its id is a rowid: no row is ever deleted, a duplicate takes none)."""
        if self._con is None:
            self._con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        return int(self._con.execute("SELECT COALESCE(MAX(id), 0) FROM raw").fetchone()[0])

    def wait_committed(self, n: int, timeout: float = 1800) -> float:
        """Until n rows are in raw; the time it took."""
        t0 = time.monotonic()
        while self.committed() < n:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{self.committed()} of {n} committed")
            time.sleep(0.002)
        return time.monotonic() - t0


def state_sizes(db: pathlib.Path) -> str:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "ledger_state" not in tables:
            return "no ledger_state table in this database (metering state not stored)"
        per = [
            int(r[0])
            for r in con.execute("SELECT SUM(LENGTH(blob)) FROM ledger_state GROUP BY sid")
        ]
        text = (
            f"ledger_state per station: median {statistics.median(per):,.0f} B, "
            f"max {max(per):,} B ({len(per)} stations, all views)"
            if per
            else "ledger_state is empty"
        )
        if "ledger_checkpoint" in tables:
            cp = con.execute(
                "SELECT COUNT(*), SUM(LENGTH(blob) + LENGTH(lows)) FROM ledger_checkpoint"
            ).fetchone()
            n = max(1, len(per))
            text += (
                f"; ledger_checkpoint: {cp[0] / n:,.1f} snapshots, "
                f"{(cp[1] or 0) / n:,.0f} B per station"
            )
        return text
    finally:
        con.close()


class Poller:
    """Sees rows appear in raw (every 2 ms): (sid, seq) → wall time first seen."""

    def __init__(self, db: pathlib.Path, since: int) -> None:
        self.db, self.last = db, since
        self.seen: dict[tuple[str, int], float] = {}
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        while not self.stop.is_set():
            rows = con.execute(
                "SELECT id, sid, seq FROM raw WHERE id > ? ORDER BY id", (self.last,)
            ).fetchall()
            t = time.time()
            for rid, s, q in rows:
                self.seen[(s, q)] = t
                self.last = rid
            time.sleep(0.002)
        con.close()


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


# ---- the run -------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=None, help="default 2,000,000")
    ap.add_argument("--stations", type=int, default=100)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="about 100k messages")
    ap.add_argument("--sync", default="full", choices=["full", "normal"])
    ap.add_argument("--latency-seconds", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the database")
    args = ap.parse_args()
    warn_if_busy()
    n = args.messages or (100_000 if args.quick else 2_000_000)
    big = n >= 500_000
    restart_at = 100_000 if big else n * 4 // 10
    backlog = 200_000 if big else n * 3 // 10
    lat_s = args.latency_seconds or (10 if big else 4)
    lat_n = RATE * lat_s
    if restart_at + backlog + lat_n > n:
        raise SystemExit(f"--messages {n} is too few for the phases")
    marks = [m for m in (10_000, 100_000, 1_000_000, 2_000_000) if restart_at < m < n]

    data, offs = frames(n, args.stations, args.slots)
    size = (offs[-1] - offs[0]) / n
    print(
        f"soak: {n:,} telemetry messages, {args.stations} stations, {args.slots} slots "
        f"(~{size:.0f} B PUBLISH each), QoS 1, synchronous={args.sync}; agent on core 0, "
        f"broker and publisher on core {min(OTHER_CPU)}"
    )
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))  # so that `finally` cleans up
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="soak-"))
    broker = Mosquitto(tmp / "mq", max_queued=0, insecure=True)
    broker.conf.write_text(broker.conf.read_text().replace("persistence true", "persistence false"))
    broker.start()
    assert broker.proc is not None
    pin(broker.proc.pid, OTHER_CPU)
    pin(0, OTHER_CPU)
    db = tmp / "agent.db"
    with KeyStore(f"sqlite:///{db}") as ks:
        for j in range(args.stations):
            ks.add(sid(j), key_for(sid(j)))
    agent = Agent(tmp, db, broker.port, args.sync)
    pub: RawPublisher | None = None
    rss: list[tuple[int, str, float]] = []
    try:
        t_ready = agent.start_ready()
        print(f"start on an empty database: ready in {t_ready:.2f}s")
        pub = RawPublisher(broker.port, data, offs)

        def commits() -> tuple[float, float]:
            """(seconds in commits, commits) of this agent process so far (/metrics)."""
            return (
                agent.metric("stationctl_agent_commit_seconds_sum"),
                agent.metric("stationctl_agent_commit_seconds_count"),
            )

        def live(lo: int, hi: int, what: str) -> None:
            assert pub is not None
            t0 = time.monotonic()
            s0, c0 = commits()
            pub.send(lo, hi, agent.committed)
            agent.wait_committed(hi)
            dt = time.monotonic() - t0
            s1, c1 = commits()
            print(
                f"live {lo:>9,} → {hi:>9,}: {(hi - lo) / dt:9,.0f} msg/s; in commits "
                f"{(s1 - s0) / dt:.0%} of the time, {(hi - lo) / max(1, c1 - c0):,.0f} msg and "
                f"{(s1 - s0) / max(1, c1 - c0) * 1e3:.0f} ms per commit"
            )
            rss.append((hi, what, agent.rss_mb()))

        def stop_start(at: int) -> None:
            took, rc = agent.stop(timeout=60)
            print(f"at {at:,}: SIGTERM → exit {took:.2f}s (status {rc})")
            t = agent.start_ready()
            print(f"at {at:,}: restart → ready (subscribed) {t:.2f}s ({agent.startup_lines()})")

        # 1. live up to the restart point
        pos = 0
        for m in [x for x in (10_000, 100_000) if x <= restart_at] + [restart_at]:
            if m > pos:
                live(pos, m, "process 1")
                pos = m
        print(f"at {pos:,}: {state_sizes(db)}")

        # 2. SIGTERM; a backlog queued for the agent and for two bare subscribers, one of
        # its own client and one of paho (the comparator); each bare one drains it
        # (core 0), then the agent starts and drains it
        took, rc = agent.stop(timeout=60)
        print(f"at {pos:,}: SIGTERM → exit {took:.2f}s (status {rc})")
        from bench_ingest import bare_drain, bare_own, bare_session

        asyncio.run(bare_own(broker.port, 0))
        bare_session(broker.port)
        pub.send(pos, pos + backlog)
        pub.wait_acked()
        time.sleep(1.0)
        pin(0, AGENT_CPU)
        bare = asyncio.run(bare_own(broker.port, backlog))
        paho = bare_drain(broker.port, backlog)
        pin(0, OTHER_CPU)
        t0 = time.monotonic()
        t_ready = agent.start_ready()
        print(
            f"at {pos:,}: restart → ready (subscribed) {t_ready:.2f}s, {backlog:,} waiting "
            f"({agent.startup_lines()})"
        )
        agent.wait_committed(pos + backlog)
        drain = time.monotonic() - t0
        rate = backlog / (drain - t_ready)
        print(
            f"backlog of {backlog:,}: agent {rate:,.0f} msg/s from ready "
            f"({backlog / drain:,.0f} msg/s from the start, {drain:.1f}s); bare own client "
            f"{bare:,.0f} msg/s, ratio {rate / bare:.2f}; bare paho {paho:,.0f} msg/s, "
            f"ratio {rate / paho:.2f}"
        )
        pos += backlog
        rss.append((pos, "process 2 (warm-up)", agent.rss_mb()))

        # 3. latency at 5,000 msg/s paced
        time.sleep(1.0)
        poll = Poller(db, agent.committed())
        times = pub.paced(pos, pos + lat_n, RATE)
        agent.wait_committed(pos + lat_n)
        time.sleep(0.05)
        poll.stop.set()
        poll.t.join()
        lat = []
        for i, t in zip(range(pos, pos + lat_n), times, strict=True):
            seen = poll.seen.get((sid(i % args.stations), i // args.stations))
            if seen is not None:
                lat.append(seen - t)
        print(
            f"latency publish → committed at {RATE:,} msg/s for {lat_s}s "
            f"({len(lat):,} messages, at {pos:,}): p50 {pct(lat, 50) * 1e3:.1f} ms, "
            f"p99 {pct(lat, 99) * 1e3:.1f} ms, max {max(lat) * 1e3:.1f} ms"
        )
        pos += lat_n

        # 4. live to the end, RSS at each mark
        for m in [*marks, n]:
            if m > pos:
                live(pos, m, "process 2")
                pos = m
        print(f"at {pos:,}: {state_sizes(db)}")
        stop_start(pos)
        rss.append((pos, "process 3, just started", agent.rss_mb()))

        print("RSS of the agent (messages committed: MB):")
        ref = next((r for r in rss if r[1].startswith("process 2")), rss[-1])[2]
        for at, what, mb in rss:
            print(f"  {at:>10,}  {mb:7.1f} MB  ({what}; {mb / ref:.2f} × process 2's warm-up)")
        took, rc = agent.stop(timeout=60)
        print(f"at {pos:,}: SIGTERM → exit {took:.2f}s (status {rc})")
        sz = db.stat().st_size
        print(f"database {sz / 1e9:.2f} GB ({sz / n:.0f} B per message)")
        print(json.dumps({"rss_mb": [(a, round(m, 1)) for a, _, m in rss]}))
    finally:
        if pub is not None:
            try:
                pub.close()
            except OSError:
                pass
        agent.kill()
        broker.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

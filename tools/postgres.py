"""A private PostgreSQL cluster on a free loopback port, for tests and benches.

`initdb` + `pg_ctl` in a temporary directory (as the `postgres` user when run as root:
PostgreSQL refuses to run as root), trust authentication on 127.0.0.1 only, `C` locale.
It can be killed (SIGKILL, as a crash) and started again on the same port and data
directory, which is how tests simulate a database outage.
"""

from __future__ import annotations

import glob
import os
import pathlib
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

from tools.mosquitto import free_port


def pg_bin(name: str) -> str:
    """Path of a PostgreSQL server program (Debian keeps them out of PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for cand in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return cand
    raise RuntimeError(f"{name} is not installed: run `make setup` (Debian package postgresql)")


class PgCluster:
    """One private cluster; `url(db)` for a database in it, `create_db()` for a fresh one."""

    def __init__(self, base: str | os.PathLike[str] | None = None) -> None:
        self._own_tmp = base is None
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="stationctl-pg-") if base is None else base)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self._user: pwd.struct_passwd | None = None
        self._n = 0
        if os.geteuid() == 0:
            try:
                self._user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root needs a `postgres` user (Debian package postgresql)"
                ) from None
            os.chmod(self.dir, 0o755)
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        def demote() -> None:
            if self._user is not None:
                os.setgid(self._user.pw_gid)
                os.setuid(self._user.pw_uid)

        env = dict(os.environ, LC_ALL="C", LANG="C")
        return subprocess.run(
            list(cmd),
            preexec_fn=demote if self._user is not None else None,  # noqa: PLW1509
            env=env,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def init(self) -> PgCluster:
        self._run(
            pg_bin("initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--locale=C",
            "-E",
            "UTF8",
            "--no-sync",
        )
        conf = self.data / "postgresql.conf"
        with open(conf, "a") as f:
            f.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.dir}'\n"
                "max_connections = 200\nfsync = on\nshared_buffers = 64MB\n"
                "log_min_messages = warning\n"
            )
        return self

    def start(self) -> PgCluster:
        self._run(
            pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start"
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def kill(self) -> None:
        """SIGKILL the postmaster and its children, as a crash (the next start recovers)."""
        pid_file = self.data / "postmaster.pid"
        if not pid_file.exists():
            return
        pid = int(pid_file.read_text().split()[0])
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
        kids = [int(x) for x in out.stdout.split()]
        for p in [pid, *kids]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        # a killed postmaster leaves its pid file; pg_ctl start copes when the pid is gone

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_db(self, name: str | None = None) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        if name is None:
            self._n += 1
            name = f"t{os.getpid()}_{self._n}"
        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}"')
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        self.stop("immediate")
        if self._own_tmp:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self.init().start()

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Mosquitto password files: one `user:hash` line per user, as `mosquitto_passwd` writes them.

The hash is Mosquitto 2.0's default, `$7$<iterations>$<salt b64>$<hash b64>`: PBKDF2-HMAC-SHA512
over the password with a 12-byte random salt and 101 iterations, base64 with padding. The
broker re-reads the file on SIGHUP. Other users' lines (the agent's, operators', any hash
kind) are kept byte for byte; the file is replaced atomically with mode 0600.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import pathlib
import secrets
import tempfile

ITERATIONS = 101  # mosquitto_passwd's default for sha512-pbkdf2
SALT_BYTES = 12


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """The `$7$…` hash of a password (a fresh random salt unless one is given)."""
    if salt is None:
        salt = secrets.token_bytes(SALT_BYTES)
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(dk).decode()}"


def check_password(password: str, hashed: str) -> bool:
    """True when `hashed` (a `$7$` entry) is the hash of `password`."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7":
        raise ValueError("not a $7$ (sha512-pbkdf2) hash")
    salt = base64.b64decode(parts[3])
    want = base64.b64decode(parts[4])
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]))
    return hmac.compare_digest(dk, want)


def new_password() -> str:
    """A random broker password: 32 URL-safe characters (192 bits)."""
    return secrets.token_urlsafe(24)


def read_lines(path: str | os.PathLike[str]) -> list[str]:
    p = pathlib.Path(path)
    if not p.exists():
        return []
    return p.read_text().splitlines()


def user_of(line: str) -> str | None:
    s = line.strip()
    if not s or s.startswith("#") or ":" not in s:
        return None
    return s.split(":", 1)[0]


def entry(path: str | os.PathLike[str], user: str) -> str | None:
    """The user's current line, or None."""
    for line in read_lines(path):
        if user_of(line) == user:
            return line
    return None


def set_line(path: str | os.PathLike[str], user: str, line: str | None) -> str | None:
    """Replace the user's line with `line` (None removes it; appended when new). Returns the
    previous line (None when there was none), which is what a rollback puts back."""
    if ":" in user or "\n" in user or not user:
        raise ValueError(f"bad broker user name {user!r}")
    old: str | None = None
    out: list[str] = []
    for ln in read_lines(path):
        if user_of(ln) == user:
            if old is None:
                old = ln
                if line is not None:
                    out.append(line)
            continue  # a duplicate line for the user: drop it (Mosquitto would use the first)
        out.append(ln)
    if old is None and line is not None:
        out.append(line)
    _write_atomic(pathlib.Path(path), "".join(x + "\n" for x in out))
    return old


def set_password(path: str | os.PathLike[str], user: str, password: str) -> str | None:
    """Add or update the user's credentials; returns the previous line (for a rollback)."""
    return set_line(path, user, f"{user}:{hash_password(password)}")


def _write_atomic(p: pathlib.Path, text: str) -> None:
    """Replace the file at once; an existing file keeps its mode and owner (the broker,
    running as its own user, must still read it after a SIGHUP), a new one is 0600."""
    p.parent.mkdir(parents=True, exist_ok=True)
    st = p.stat() if p.exists() else None
    fd, tmp = tempfile.mkstemp(prefix="." + p.name + ".", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600 if st is None else st.st_mode & 0o777)
        if st is not None and os.geteuid() == 0:
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise

# Tiny helpers shared by firmware unit tests. The tests run under pytest on CPython and
# under tests/fw/run.py on the MicroPython unix port, so they use plain asserts and only
# what both interpreters have.
import json
import os

_HERE = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
VECTORS = _HERE + "/../vectors"


def raises(exc, fn, *args, **kw):
    """Call fn and return the exception it raised; fail if it raised nothing or another type."""
    try:
        fn(*args, **kw)
    except exc as e:
        return e
    raise AssertionError("expected %s from %r" % (exc.__name__, fn))


def vector(name):
    """Load tests/vectors/<name> (JSON)."""
    with open(VECTORS + "/" + name) as f:
        return json.load(f)


def tmpdir(tag):
    """A fresh, empty scratch folder (both interpreters lack tempfile)."""
    base = os.getenv("FWTEST_TMP") or "/tmp"
    n = 0
    while True:
        path = "%s/fwtest-%s-%d-%d" % (base, tag, os.getpid() if hasattr(os, "getpid") else 0, n)
        try:
            os.mkdir(path)
            return path
        except OSError:
            n += 1

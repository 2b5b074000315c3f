# Runs firmware unit tests on the MicroPython unix port (and on CPython, for parity):
#   micropython tests/fw/run.py [test_module ...]
# Every function named test_* in each module is called; prints one line per failure and
# a closing "N passed, N failed" line; exit status 1 when anything failed.
import os
import sys

here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
sys.path.insert(0, here)
sys.path.insert(0, here + "/../../firmware")

try:
    getpid = os.getpid  # type: ignore[attr-defined]
except AttributeError:
    getpid = None


def main(argv):
    names = argv or sorted(
        f[:-3] for f in os.listdir(here) if f.startswith("test_") and f.endswith(".py")
    )
    passed = failed = 0
    for name in names:
        if name.endswith(".py"):
            name = name.rsplit("/", 1)[-1][:-3]
        mod = __import__(name)
        for attr in sorted(dir(mod)):
            if not attr.startswith("test_"):
                continue
            fn = getattr(mod, attr)
            if not callable(fn):
                continue
            try:
                fn()
                passed += 1
            except Exception as e:  # report and go on: one failure should not hide the others
                failed += 1
                print("FAIL %s.%s: %s: %s" % (name, attr, type(e).__name__, e))
                if hasattr(sys, "print_exception"):
                    sys.print_exception(e)  # type: ignore[attr-defined]
                else:
                    import traceback

                    traceback.print_exc()
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed or not passed else 0


sys.exit(main(sys.argv[1:]))

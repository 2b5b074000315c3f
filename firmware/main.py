# Entry point, the same on the ESP32 and on the MicroPython unix port:
#   cd FLASHDIR && micropython PATH/TO/firmware/main.py
# reads FLASHDIR/config.json and keeps counters and the outbox in FLASHDIR.
#
# The boot wrapper of firmware updates (ota.py, docs/firmware.md "Updates (OTA)"), never
# updated itself: it picks the version before any other module is imported (a trial boot is
# counted on flash first), runs it from its folder, and falls back to the confirmed version at
# once when the trial's modules do not import or refuse the configuration. Kept this short
# because its bytecode stays in the heap for as long as the station runs.
import os
import sys

_s = (None, None, False, None)  # (folder or None, version or None, trial, sys.path as it was)
_u = False  # ever updated: the OTA state exists (else no OTA code is loaded before app)
for _n in ("ota.a", "ota.b"):
    try:
        os.stat(_n)
        _u = True
    except OSError:
        pass
if _u:
    import ota

    _s = ota.boot()
    ota.enter(_s)  # sys.path for that version; the modules imported so far let go of, ota too
    del ota
try:
    import app
except Exception as e:  # noqa: BLE001  (ImportError, SyntaxError, MemoryError, …)
    if _s[0] is None:
        raise  # the factory files themselves: nothing older to fall back on
    sys.path.clear()
    sys.path.extend(_s[3])
    import ota

    _s = ota.fallback(_s, e)
    del ota
    import app
if _s[1] is not None:
    app.FW_VERSION = _s[1]

try:
    app.main()
except KeyboardInterrupt:
    pass
except app.StartError as e:
    # a bad configuration stops the start with the key's name (CONTRACT §9)
    print("station: cannot start:", e)
    if _s[2]:
        import ota

        ota.fail_now("config")  # the confirmed version takes it at the next boot
        ota.reset(3)
    sys.exit(2)
except Exception as e:  # noqa: BLE001
    if not _s[2]:
        raise
    sys.print_exception(e)  # type: ignore[attr-defined]
    import ota

    ota.crashed()  # counted: past `boots` trial boots the confirmed version returns
    ota.reset(1)

# Entry point, the same on the ESP32 and on the MicroPython unix port:
#   cd FLASHDIR && micropython PATH/TO/firmware/main.py
# reads FLASHDIR/config.json and keeps counters and the outbox in FLASHDIR.
#
# The boot wrapper of firmware updates (ota.py, docs/firmware.md "Updates (OTA)"): it is
# never updated itself. It picks the version before any other module is imported (a trial
# boot is counted on flash first), runs it from its folder, and falls back to the confirmed
# version at once when the trial's modules do not import or refuse the configuration.
import sys

import ota

_sel = ota.boot()
_path0 = list(sys.path)
_here = sys.path[0] if sys.path else ""
_mods = list(sys.modules)


def _use(sel):
    """Import app from the version sel names: its folder first and alone (the factory files
    beside main.py are not a fallback for a missing module)."""
    sys.path.clear()
    if sel.path is not None:
        sys.path.append(sel.path)
        for p in _path0:
            if p not in (_here, "", "."):
                sys.path.append(p)
        sys.modules.pop("ota", None)  # the version's own OTA code runs it
    else:
        sys.path.extend(_path0)
    import app

    if sel.ver is not None:
        app.FW_VERSION = sel.ver
    return app


def _forget():
    for name in list(sys.modules):
        if name not in _mods:
            del sys.modules[name]
    sys.modules["ota"] = ota


def _reset(code):
    if sys.platform == "esp32":
        import machine  # type: ignore[import-not-found]

        machine.reset()
    sys.exit(code)  # the unix port: a supervisor (or the test) starts it again


try:
    app = _use(_sel)
except Exception as e:  # noqa: BLE001  (ImportError, SyntaxError, MemoryError, …)
    if _sel.path is None:
        raise  # the factory files themselves: nothing older to fall back on
    print("station: version %s does not import (%r): falling back" % (_sel.ver, e))
    _forget()
    # a trial is rolled back for good; a confirmed version gone bad (flash damage) gives way
    # to the factory files for this boot
    _sel = ota.fail_now("import") if _sel.trial else ota.Boot(None, None, False)
    app = _use(_sel)

try:
    app.main()
except KeyboardInterrupt:
    pass
except app.StartError as e:
    # a bad configuration stops the start with the key's name (CONTRACT §9)
    print("station: cannot start:", e)
    if _sel.trial:
        ota.fail_now("config")  # the confirmed version takes it at the next boot
        _reset(3)
    sys.exit(2)
except Exception as e:  # noqa: BLE001
    if not _sel.trial:
        raise
    sys.print_exception(e)  # type: ignore[attr-defined]
    ota.crashed()
    _reset(1)

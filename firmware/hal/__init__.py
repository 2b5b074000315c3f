# Picks the hardware layer by platform. Nothing outside hal/ imports machine.
import sys

if sys.platform == "esp32":
    from hal import esp32 as board  # type: ignore[attr-defined]
else:
    from hal import unix as board  # type: ignore[no-redef]

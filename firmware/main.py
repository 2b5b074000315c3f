# Entry point, the same on the ESP32 and on the MicroPython unix port:
#   cd FLASHDIR && micropython PATH/TO/firmware/main.py
# reads FLASHDIR/config.json and keeps counters and the outbox in FLASHDIR.
import sys

import app

try:
    app.main()
except KeyboardInterrupt:
    pass
except app.StartError as e:
    # a bad configuration stops the start with the key's name (CONTRACT §9)
    print("station: cannot start:", e)
    sys.exit(2)

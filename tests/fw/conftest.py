# Firmware modules import each other as top-level names, as they do on the board's flash.
import os
import sys

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "firmware")))

"""`stationctl flash`: provision and commission station boards (docs/flashing.md).

provision.py   one board, start to finish (Request -> Outcome), with rollback
board.py       the board: mpremote's raw REPL (probe, files, sha256 on the board, restart,
               self-test, start) and esptool (chip, erase, write, verify)
plan.py        config.json (validated by firmware/config.py) and the compiled firmware
agentdb.py     the agent's answer (known, kids, highest boot) and key registration
passwd.py      Mosquitto password files ($7$ PBKDF2-SHA512)
broker.py      the broker config template and ACL, rendered for a fleet
bulk.py        batch CSV, rich progress bars, summary table
report.py      commissioning reports (JSON and text)
virtual.py     virtual boards for rigs and tests (unix port on a pty, mock ROM bootloader)
"""

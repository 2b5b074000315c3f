"""`python -m stationctl`: the same as the console script."""

import sys

from stationctl.cli import main

sys.exit(main())

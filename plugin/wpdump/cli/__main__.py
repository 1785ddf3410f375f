"""``python -m wpdump.cli``."""

import sys

from . import main

sys.exit(main())

"""`python -m kvpack`."""

import sys

from kvpack.cli import main

sys.exit(main())

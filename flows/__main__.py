"""``python -m flows``: the ``ftflow`` command without the console script."""

import sys

from flows.cli import main

sys.exit(main())

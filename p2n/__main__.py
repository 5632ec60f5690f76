"""``python -m p2n`` is the ``p2n`` command."""

import sys

from p2n.cli import main

sys.exit(main())

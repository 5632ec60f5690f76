import sys

from p2n.cli import main

sys.exit(main())

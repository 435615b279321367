"""``python -m keyguard_server``: the same as the ``keyguard-server`` command."""

import sys

from keyguard_server.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m bns_pipe`` is the ``bns-pipe`` command."""

import sys

from bns_pipe.cli import main

sys.exit(main())

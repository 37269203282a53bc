"""``python -m ranger_ps`` is the ``ranger-ps`` command."""

import sys

from ranger_ps.cli import main

sys.exit(main())

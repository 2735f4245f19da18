"""``python -m fxdecomp.cli`` (as ``python -m fxdecomp``)."""

import sys

from . import main

sys.exit(main())

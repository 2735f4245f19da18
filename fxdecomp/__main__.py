"""``python -m fxdecomp``: the command line (see `fxdecomp.cli`).

Example::

    python -m fxdecomp demo
"""

import sys

from .cli import main

sys.exit(main())

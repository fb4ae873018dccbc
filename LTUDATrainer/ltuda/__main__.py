"""`python -m ltuda` is the `ltuda` command (what the Slicer module runs in its subprocess)."""

import sys

from .cli import main

sys.exit(main())

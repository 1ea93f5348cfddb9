"""``python -m tripletlab``."""

import sys

from .cli import main

sys.exit(main())

"""`python -m live`: the same as the `live-v2v` command."""

import sys

from .cli import main

sys.exit(main())

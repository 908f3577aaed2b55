"""``python -m langmerge ...`` (and ``accelerate launch -m langmerge ...``)."""

import sys

from langmerge.cli import main

sys.exit(main())

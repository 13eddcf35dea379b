"""``python -m shared_code``: the operator's command line."""

import sys

from shared_code.cli import main

sys.exit(main())

"""``python -m shared_code``: the operator's command line."""

import sys

from shared_code.bootstrap import tune_interpreter
from shared_code.cli import main

tune_interpreter()  # as function_app.py: a sync run from the CLI reads ahead as the timer's does
sys.exit(main())

"""``python -m dpfunc`` = the ``dpfunc`` command line."""

import sys

from dpfunc.cli import main

sys.exit(main())

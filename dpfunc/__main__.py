"""``python -m dpfunc`` = the ``dpfunc`` command line."""

from dpfunc.cli import main
from dpfunc.distributed import run_and_exit

run_and_exit(main)

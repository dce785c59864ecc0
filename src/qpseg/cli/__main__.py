"""``python -m qpseg.cli`` (and ``torchrun -m qpseg ...`` via :mod:`qpseg.__main__`)."""

from qpseg.cli import run

run()

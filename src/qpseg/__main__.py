"""``python -m qpseg`` runs the CLI (also the entry point for ``torchrun -m qpseg``)."""

from qpseg.cli import run

run()

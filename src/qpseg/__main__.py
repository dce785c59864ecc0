"""``python -m qpseg`` runs the CLI (also the entry point for ``torchrun -m qpseg``)."""

from qpseg.cli import run

if __name__ == "__main__":  # not when a spawned worker process imports this module
    run()

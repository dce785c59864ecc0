"""Generated test data with known ground truth (used by the test suite and ``qpseg demo``).

Import submodules directly (``from qpseg.testing.synthetic import make_slide``); this package
imports nothing heavy by itself.
"""

from __future__ import annotations

__all__: list[str] = []

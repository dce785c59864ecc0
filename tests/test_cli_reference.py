"""docs/cli.md is generated from the commands' --help and must stay in sync with them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_cli_reference.py"),
                          "--check"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_readme_lists_every_command() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from gen_cli_reference import commands
    finally:
        sys.path.pop(0)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [c for c in commands() if f"`qpseg {c}" not in readme]
    assert not missing, f"README's command table lacks {missing}"

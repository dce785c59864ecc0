"""``qpseg infer``'s --min-area-um2 / --fill-holes-um2: the defaults live in
qpseg.objects.REVIEW_DEFAULTS, --help states each with its reason, and 0 stays possible."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from qpseg.engine import InferenceParams
from qpseg.errors import ConfigError
from qpseg.objects import REVIEW_DEFAULTS


def _option_help(text: str, option: str) -> str:
    """The help paragraph of ``option`` in ``--help`` output, on one line."""
    start = text.index(option)
    rest = text[start + len(option):]
    end = re.search(r"\n\s+--", rest)
    return " ".join((rest[:end.start()] if end else rest).split())


def test_infer_help_states_the_review_defaults() -> None:
    out = subprocess.run([sys.executable, "-m", "qpseg", "infer", "--help"],
                         capture_output=True, text=True, env={"COLUMNS": "200", "PATH": ""},
                         check=True).stdout
    min_area = _option_help(out, "--min-area-um2")
    holes = _option_help(out, "--fill-holes-um2")
    assert "0 keeps every object" in min_area and "0 fills none" in holes
    names = {"lesion": "lesions", "tissue": "tissue classes", "nucleus": "nuclei"}
    for kind, (area, hole) in REVIEW_DEFAULTS.items():
        assert f"{names[kind]} {area:g} (" in min_area, kind   # each number with its reason
        assert f"{names[kind]} {hole:g} (" in holes, kind


def test_inference_params_default_to_review_defaults() -> None:
    p = InferenceParams()
    assert p.min_area_um2 is None and p.fill_holes_um2 is None
    assert p.validate().min_area_um2 is None
    assert InferenceParams(min_area_um2=0, fill_holes_um2=0).validate().min_area_um2 == 0
    with pytest.raises(ConfigError, match="min_area_um2"):
        InferenceParams(min_area_um2=-1).validate()

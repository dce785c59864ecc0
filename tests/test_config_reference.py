"""docs/config.md is generated from the training configuration's code and must stay in sync."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gen_config_reference as gen  # noqa: E402

sys.path.pop(0)


def test_config_reference_is_current() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_config_reference.py"),
                          "--check"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_key_the_code_accepts_is_in_the_reference() -> None:
    from qpseg.data.augment import AugmentConfig
    from qpseg.training import config

    text = gen.render()
    sections = text.split("\n## ")
    for section, keys in config.GENERIC_DEFAULTS.items():
        body = next(s for s in sections if s.startswith(f"`{section}`"))
        names = set(keys) | ({f.name for f in dataclasses.fields(AugmentConfig)}
                             if section == "augment" else set())
        missing = [k for k in names if f"| `{k}` |" not in body]
        assert not missing, f"{section}: {missing}"
    top = next(s for s in sections if s.startswith("Top-level keys"))
    assert all(f"| `{k}` |" in top for k in config._TOP_KEYS)


def test_descriptions_come_from_the_comments_beside_the_keys() -> None:
    source = '''
TABLE = {
    "a": {
        "one": 1,  # the first
        # above the second
        "two": [1,
                2],  # beside it
        "three": None,  # starts here
        #                 and goes on
        "four": 4,
    },
}
'''
    got = gen._dict_descriptions(source, "TABLE")["a"]
    assert got == {"one": "the first", "two": "above the second beside it",
                   "three": "starts here and goes on", "four": ""}
    text = gen.render()
    assert "| `min_tissue` | `0.25` | pedersen2022_patch: `0.25` | pedersen2022 §2.2 |" in text
    assert "features: vgg16 \\| rgb, weights: PATH}" in text  # loss.clusters' second line
    assert "| `hsv_shift` | `0.0` | on the 0-255 scale (pedersen2022: 20) |" in text


def test_every_key_has_a_description() -> None:
    assert gen.undocumented() == []
    text = gen.render()
    assert gen.NO_DESCRIPTION not in text
    # a key described by the comment beside it, one by the comment above, a top-level key
    assert "| `keep_checkpoints` | `1` |  | newest step checkpoints kept" in text
    assert "| `min_class_pixels` | `1` |  | hierarchical sampler: a tile counts" in text
    assert "| `paper` | free-text note of the recipe's source (kept, not used) |" in text

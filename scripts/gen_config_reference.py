"""Write docs/config.md, the training-configuration reference, from the code that defines it.

The keys and their generic defaults come from ``qpseg.training.config.GENERIC_DEFAULTS`` (the
table ``qpseg train`` validates against), each paper's values from ``PAPER_DEFAULTS``, the
``augment`` keys from the fields of ``qpseg.data.augment.AugmentConfig`` and the top-level keys
from ``_TOP_KEYS``; the descriptions are the comments written beside those keys in the source.
Nothing is kept by hand here, so a key added in the code appears in the reference, and
tests/test_config_reference.py fails until the file is regenerated.

    python scripts/gen_config_reference.py          # rewrite docs/config.md
    python scripts/gen_config_reference.py --check  # exit 1 when docs/config.md is out of date
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import sys
import tokenize
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "config.md"
NO_DESCRIPTION = "(no description in the source yet)"


def _comments(source: str) -> dict[int, tuple[int, str]]:
    """Line number -> (column, text after ``#``) of every comment in ``source``."""
    out: dict[int, tuple[int, str]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = (tok.start[1], tok.string[1:])
    return out


def _code_lines(source: str) -> set[int]:
    """Lines holding anything but a comment."""
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                            tokenize.DEDENT, tokenize.ENDMARKER):
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def _describe(spans: list[tuple[str, int, int]], comments: dict[int, tuple[int, str]],
              code: set[int], end: int) -> dict[str, str]:
    """Descriptions of entries given as ``(key, first line, last line)`` in source order:
    the comment lines right above an entry (after the previous one), the comments on its own
    lines, and comment-only lines after it that continue its last comment (text indented
    after the ``#``)."""
    out: dict[str, str] = {}
    for k, (key, first, last) in enumerate(spans):
        prev_end = spans[k - 1][2] if k else first - 1
        nxt = spans[k + 1][1] if k + 1 < len(spans) else end
        above = []
        for ln in range(prev_end + 1, first):
            if ln in comments and ln not in code and not comments[ln][1].startswith("  "):
                above.append(comments[ln][1].strip())
        own = [comments[ln][1].strip() for ln in range(first, last + 1) if ln in comments]
        after = []
        for ln in range(last + 1, nxt):
            if ln in comments and ln not in code and comments[ln][1].startswith("  "):
                after.append(comments[ln][1].strip())
            else:
                break
        text = " ".join(t for t in [*above, *own, *after] if t)
        out[key] = " ".join(text.split())
    return out


def _dict_descriptions(source: str, name: str) -> dict[str, dict[str, str]]:
    """Per section of the module-level dict ``name``: key -> description."""
    tree = ast.parse(source)
    comments, code = _comments(source), _code_lines(source)
    table: ast.Dict | None = None
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
            if isinstance(target, ast.Name) and target.id == name and \
                    isinstance(node.value, ast.Dict):
                table = node.value
                break
    if table is None:
        raise SystemExit(f"{name} not found")
    out: dict[str, dict[str, str]] = {}
    for sk, sv in zip(table.keys, table.values, strict=True):
        if not isinstance(sk, ast.Constant) or not isinstance(sv, ast.Dict):
            continue
        spans = [(str(k.value), k.lineno, v.end_lineno or v.lineno)
                 for k, v in zip(sv.keys, sv.values, strict=True) if isinstance(k, ast.Constant)]
        out[str(sk.value)] = _describe(spans, comments, code, sv.end_lineno or sv.lineno)
    return out


def _class_descriptions(source: str, name: str) -> dict[str, str]:
    """Field -> description of the dataclass ``name`` (comments beside its fields)."""
    tree = ast.parse(source)
    comments, code = _comments(source), _code_lines(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    spans = [(n.target.id, n.lineno, n.end_lineno or n.lineno) for n in cls.body
             if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    return _describe(spans, comments, code, spans[-1][2] + 1 if spans else cls.lineno)


def _top_descriptions(doc: str, keys: tuple[str, ...]) -> dict[str, str]:
    """Top-level keys described in the config module's docstring (``key: ... # text``)."""
    out: dict[str, str] = {}
    for line in doc.splitlines():
        head, _, comment = line.partition("#")
        key = head.strip().split(":")[0]
        if key in keys and ":" in head and comment.strip():
            out[key] = " ".join(comment.split())
    return out


def _yaml(value: Any) -> str:
    """A value as it is written in a YAML config."""
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value, ensure_ascii=False).replace('"', "") if isinstance(
        value, str) else json.dumps(value, ensure_ascii=False)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _papers(papers: Mapping[str, Mapping[str, Any]], section: str, key: str) -> str:
    vals = [f"{p}: `{_yaml(cfg[section][key])}`" for p, cfg in papers.items()
            if key in cfg.get(section, {})]
    return "; ".join(vals)


def render() -> str:
    """The whole reference as Markdown."""
    from qpseg.data import augment
    from qpseg.training import config

    cfg_source = inspect.getsource(config)
    described = _dict_descriptions(cfg_source, "GENERIC_DEFAULTS")
    top = _top_descriptions(config.__doc__ or "", config._TOP_KEYS)
    parts = [
        "# qpseg training configuration reference\n",
        "Generated by `python scripts/gen_config_reference.py` from "
        "`qpseg.training.config` (the keys, defaults and the comments beside them) and "
        "`qpseg.data.augment.AugmentConfig`; a test fails when this file is out of date.\n",
        "A configuration is a YAML or JSON file (`qpseg train --config FILE`). Values resolve "
        "in this order: generic defaults < the defaults of the architecture's paper < the "
        "file < command-line options. An unknown section or key is an error that names it.\n",
        "## Top-level keys\n",
        "| key | what it is |", "|---|---|",
    ]
    for key in config._TOP_KEYS:
        parts.append(f"| `{key}` | {_cell(top.get(key, NO_DESCRIPTION))} |")
    parts.append("")
    for section in config.SECTIONS:
        parts.append(f"## `{section}`\n")
        if section == "augment":
            parts += _augment_section(augment, config)
            continue
        parts += ["| key | default | papers | what it is |", "|---|---|---|---|"]
        for key, default in config.GENERIC_DEFAULTS[section].items():
            desc = described.get(section, {}).get(key) or NO_DESCRIPTION
            parts.append(f"| `{key}` | `{_yaml(default)}` | "
                         f"{_cell(_papers(config.PAPER_DEFAULTS, section, key))} | "
                         f"{_cell(desc)} |")
        parts.append("")
    parts.append("## Paper defaults\n")
    parts.append("Which architecture follows which paper's training (`paper_of`):\n")
    parts += ["| defaults | architectures |", "|---|---|"]
    from qpseg.models.registry import catalog

    by_paper: dict[str, list[str]] = {}
    for entry in catalog():
        by_paper.setdefault(config.paper_of(entry.name), []).append(entry.name)
    for paper in config.PAPER_DEFAULTS:
        parts.append(f"| `{paper}` | {', '.join(f'`{n}`' for n in by_paper.get(paper, []))} |")
    return "\n".join(parts).rstrip() + "\n"


def _augment_section(augment: Any, config: Any) -> list[str]:
    source = inspect.getsource(augment)
    described = _class_descriptions(source, "AugmentConfig")
    doc = " ".join((augment.AugmentConfig.__doc__ or "").split())
    presets = ", ".join(f"`{p}`" for p in config._PRESET_NAMES)
    lines = [f"{doc} `preset` picks a paper's augmentation ({presets}); the other keys "
             "override single fields of it.\n",
             "| key | default | what it is |", "|---|---|---|",
             f"| `preset` | `{_yaml(config.GENERIC_DEFAULTS['augment']['preset'])}` | "
             f"one of {presets} |"]
    for f in dataclasses.fields(augment.AugmentConfig):
        default = f.default if f.default is not dataclasses.MISSING else None
        lines.append(f"| `{f.name}` | `{_yaml(default)}` | "
                     f"{_cell(described.get(f.name) or NO_DESCRIPTION)} |")
    lines.append("")
    return lines


def undocumented() -> list[str]:
    """``section.key`` of every key whose source has no comment to describe it."""
    out = []
    section = ""
    for line in render().splitlines():
        if line.startswith("## "):
            section = line[3:].strip("`") + "." if line.startswith("## `") else ""
        elif line.startswith("| `") and NO_DESCRIPTION in line:
            out.append(section + line.split("`")[1])
    return out


def main() -> int:
    """Rewrite docs/config.md, or with --check report whether it is current."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET} is out of date: run python scripts/gen_config_reference.py")
            return 1
        return 0
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

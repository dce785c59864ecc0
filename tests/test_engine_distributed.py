"""``torchrun`` with 2 CPU processes (gloo) writes exactly what 1 process writes."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import typer
from typer.testing import CliRunner

from qpseg.cli.infer import infer
from qpseg.testing.synthetic import make_slide
from test_engine_support import colour_package

_SCRIPT = """
import sys
import typer
from qpseg.cli.infer import infer

app = typer.Typer()
app.command("infer")(infer)

@app.callback()
def _root() -> None:
    pass

sys.exit(app(args=sys.argv[1:], standalone_mode=False) or 0)
"""


app = typer.Typer()
app.command("infer")(infer)


@app.callback()
def _root() -> None:
    """Test app."""


def _torchrun(nproc: int, script: Path, slides: Path, pkg: Path, out: Path,
              *extra: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", str(nproc), str(script), "infer", str(slides), "--model",
           str(pkg), "--out", str(out), "--run-id", "dist", "--min-area-um2", "50", "--quiet",
           "--batch-size", "4", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _text(path: Path) -> str:
    return re.sub(r'"qpseg_date":\s*"[^"]*"', "", path.read_text("utf-8"))


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]


def _one_process(slides: Path, pkg: Path, out: Path, *extra: str) -> None:
    """The same run in this process, single-threaded like the torchrun workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = CliRunner().invoke(app, ["infer", str(slides), "--model", str(pkg), "--out",
                                       str(out), "--run-id", "dist", "--min-area-um2", "50",
                                       "--quiet", "--batch-size", "4", *extra],
                                 standalone_mode=False)
    finally:
        torch.set_num_threads(threads)
    assert res.return_value == 0, res.output


def test_two_processes_write_what_one_process_writes(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    for k, (w, h) in enumerate([(700, 500), (500, 400), (600, 600)]):
        make_slide(slides / f"s{k}.tif", width=w, height=h, mpp=0.5, seed=20 + k)
    pkg = colour_package(tmp_path / "pkg")
    script = tmp_path / "cli.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    _one_process(slides, pkg, tmp_path / "one")
    _torchrun(2, script, slides, pkg, tmp_path / "two")
    for k in range(3):
        for name in (f"s{k}.geojson", f"s{k}.metadata.json"):
            assert _text(tmp_path / "one" / name) == _text(tmp_path / "two" / name), name
    assert _rows(tmp_path / "one" / "summary.csv") == _rows(tmp_path / "two" / "summary.csv")
    meta = json.loads((tmp_path / "two" / "run_metadata.json").read_text())
    assert meta["world_size"] == 2 and meta["counts"]["done"] == 3
    assert {s["rank"] for s in meta["slides"]} == {0, 1}  # both ranks did work
    assert not (tmp_path / "two" / "run_metadata.shard-0-of-1.json").exists()


def test_a_huge_slide_is_shared_by_the_ranks(tmp_path: Path) -> None:
    """One slide bigger than half the work: both ranks stitch a band of its rows (blending
    across the band edge), rank 0 writes it; the small one is run whole. Same files as one
    process."""
    slides = tmp_path / "slides"
    make_slide(slides / "big.tif", width=1500, height=1100, mpp=0.5, seed=31)
    make_slide(slides / "small.tif", width=300, height=260, mpp=0.5, seed=32)
    pkg = colour_package(tmp_path / "pkg")
    script = tmp_path / "cli.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    _one_process(slides, pkg, tmp_path / "one", "--stitch", "blend")
    _torchrun(2, script, slides, pkg, tmp_path / "two", "--stitch", "blend")
    for key in ("big", "small"):
        for name in (f"{key}.geojson", f"{key}.metadata.json"):
            assert _text(tmp_path / "one" / name) == _text(tmp_path / "two" / name), name
    assert _rows(tmp_path / "one" / "summary.csv") == _rows(tmp_path / "two" / "summary.csv")
    meta = json.loads((tmp_path / "two" / "run_metadata.json").read_text())
    ranks = {s["key"]: s["ranks"] for s in meta["slides"]}
    assert ranks == {"big": 2, "small": 1}
    assert not (tmp_path / "two" / ".qpseg_work").exists()

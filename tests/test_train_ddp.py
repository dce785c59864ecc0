"""DDP on CPU: two processes (gloo) started by torchrun train one model on disjoint slides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qpseg.manifest import import_project
from qpseg.testing.projects import make_project

SCRIPT = r'''
import hashlib, json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from qpseg.training import train

manifest, out, cfg = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
res = train(manifest, out, model="tiny_unet", config=cfg)
h = hashlib.sha256()
for v in res.model.state_dict().values():
    h.update(v.detach().cpu().contiguous().numpy().tobytes())
(out / f"rank{res.rank}.json").write_text(json.dumps({
    "rank": res.rank, "world": res.world_size, "hash": h.hexdigest(),
    "steps": res.stages[0].steps}))
'''


def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    proj = make_project(tmp_path / "p", n_slides=4, width=1024, height=1024, seed=11)
    manifest = import_project(proj.path, tmp_path / "m", use_paquo=False)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    cfg = {"model_kwargs": {"tile_px": 32, "base_filters": 4, "depth": 2},
           "data": {"mpp": 4.0}, "split": {"val": 0.25, "test": 0.0},
           "train": {"batch_size": 2, "steps": 4, "log_every": 1, "checkpoint_every": 2}}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QPSEG_DIST_BACKEND": "gloo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(script), str(manifest.path), str(out), json.dumps(cfg)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["hash"] == ranks[1]["hash"]  # DDP kept the replicas identical
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4
    meta = json.loads((out / "run_metadata.json").read_text())
    assert meta["world_size"] == 2
    shards = [set(r["train_slides"]) for r in meta["ranks"]]
    assert shards[0] and shards[1] and not shards[0] & shards[1]  # every slide on one rank
    assert shards[0] | shards[1] == set(meta["split"]["train"])
    steps = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "step"] == [1, 2, 3, 4]
    ck = sorted((out / "checkpoints").glob("step-*.pt"))
    assert ck and ck[-1].name == "step-00000004.pt"
    import torch

    state = torch.load(ck[-1], map_location="cpu", weights_only=True)  # no pickled code
    assert len(state["rng"]) == 2  # both ranks' random states, for an exact resume


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun on POSIX")
def test_torchrun_environment_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from qpseg.errors import ConfigError
    from qpseg.training.distributed import setup

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ConfigError, match="RANK=5"):
        setup("cpu")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match="RANK"):
        setup("cpu")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    d = setup("cpu")
    assert not d.distributed and d.is_main and d.all_gather(3) == [3]
    with pytest.raises(ConfigError, match="not a torch device"):
        setup("gpu0")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            setup("cuda")

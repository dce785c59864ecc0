"""Every registered architecture runs through the engine (tiny variants, random weights).

The answers are not known (random weights); what is checked is that every contract the
registry declares - dense, patch, multi-magnification, ensembles, two-stage, instance - is
tiled, run, stitched at the model's output resolution and written as readable QuPath objects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qpseg.engine import InferenceParams, jobs_from_paths, run_inference
from qpseg.errors import ModelError
from qpseg.models import create_model, get_entry, list_models, save_package
from qpseg.qupath.geojson import read_geojson
from qpseg.testing.synthetic import make_slide

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    s = make_slide(tmp_path_factory.mktemp("models") / "tiny.tif", width=320, height=240,
                   mpp=0.5, seed=9)  # about 40 % tissue: background tiles are skipped
    return s.path


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_runs_through_the_engine(name: str, slide: Path,
                                                        tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = create_model(name, 2, **get_entry(name).tiny)
    pkg = save_package(tmp_path / "pkg", model, class_names=["Background", "Tumor"], mpp=0.5)
    jobs = jobs_from_paths([slide], tmp_path / "out")
    params = InferenceParams(keep_maps=True, batch_size=4, instance_margin=8)
    c = model.contract
    if any(s.kind == "heatmap" for s in c.inputs) and not c.stages:
        with pytest.raises(ModelError, match="one stage of a pipeline"):
            run_inference(jobs, pkg, tmp_path / "out", params)
        return
    res = run_inference(jobs, pkg, tmp_path / "out", params)
    r = res.results[0]
    assert r.status == "done", r.reason
    objects = read_geojson(tmp_path / "out" / "tiny.geojson")
    maps = tmp_path / "out" / "maps" / "tiny"
    cls = np.load(maps / "classes.npy")
    if c.stages:  # refinement output at max(W, H) / input size
        side = c.stages[1].inputs[0].size_px
        assert max(cls.shape) == side
    else:
        stride = c.tile_px if c.output == "patch" else c.tile_px // c.output_px
        assert cls.shape == (int(np.ceil(240 / stride)), int(np.ceil(320 / stride)))
    if c.output == "instance":
        assert (maps / "instances.npy").is_file()
        assert all(o.object_type == "cell" for o in objects)
    else:
        probs = np.load(maps / "probs.npy")
        assert probs.shape == (2, *cls.shape) and probs.max() > 0
        assert (probs.astype(int).sum(axis=0)[probs.max(axis=0) > 0] >= 254).all()
        assert all(o.classification == "Tumor" for o in objects)

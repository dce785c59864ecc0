"""ho2021 class weights and pedersen2022 z-score / PCA 95 % / k-means clustering, CWCE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpseg.data.grid import Tile
from qpseg.data.weights import (
    N_CLUSTERS,
    PCA_VARIANCE,
    ClusterModel,
    class_pixel_counts,
    cluster_weighted_cross_entropy,
    cluster_weights,
    ho_class_weights,
    kmeans,
    pca_fit,
)
from qpseg.errors import ConfigError, LabelError, QpsegError

torch.set_num_threads(1)


def test_ho_class_weights_eq2() -> None:
    tiles = [Tile(0, 0, 0, 1, (10, 60, 0)), Tile(0, 0, 0, 1, (10, 0, 20)),
             Tile(1, 0, 0, 1, (0, 0, 0))]
    counts = class_pixel_counts(tiles, 3)
    assert counts.tolist() == [20, 60, 20]
    assert ho_class_weights(counts).tolist() == pytest.approx([0.8, 0.4, 0.8])
    assert ho_class_weights([0, 5]).tolist() == [1.0, 0.0]
    with pytest.raises(LabelError):
        ho_class_weights([0, 0])
    with pytest.raises(LabelError):
        ho_class_weights([1, -1])


def _blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ten well separated clusters in 3 informative dimensions, embedded in 12 (the other
    dims are copies plus tiny noise, so PCA to 95 % keeps about 3 components)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (10, 3))
    truth = np.repeat(np.arange(10), 30)
    base = centres[truth] + rng.normal(0, 0.3, (300, 3))
    feats = np.concatenate([base, base * 2 + rng.normal(0, 0.01, (300, 3)),
                            base[:, ::-1] * -1, base + 5], axis=1)
    return feats, truth


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_pca_keeps_95_percent() -> None:
    feats, _ = _blobs()
    z = (feats - feats.mean(0)) / feats.std(0)
    comps, ratio = pca_fit(z)
    assert PCA_VARIANCE == 0.95
    assert comps.shape[0] == len(ratio) <= 3
    assert ratio.sum() >= 0.95 and (ratio.sum() - ratio[-1]) < 0.95
    assert np.allclose(comps @ comps.T, np.eye(len(comps)), atol=1e-8)
    # Agrees with scikit-learn (the dev dependency used only as a reference).
    from sklearn.decomposition import PCA

    ref = PCA(n_components=0.95, svd_solver="full").fit(z)
    assert ref.n_components_ == len(ratio)
    assert np.allclose(np.abs(ref.components_), np.abs(comps), atol=1e-6)


def test_kmeans_finds_separated_clusters() -> None:
    feats, truth = _blobs()
    centres, labels, inertia = kmeans(feats[:, :3], 10, seed=0)
    assert centres.shape == (10, 3) and inertia > 0
    assert _same_partition(labels, truth)
    few, _, _ = kmeans(np.array([[0.0], [0.0], [1.0]]), 5)
    assert len(few) == 2  # only two distinct points


def test_cluster_model_pipeline_and_torch_predict() -> None:
    feats, truth = _blobs()
    model = ClusterModel().fit(feats)
    assert N_CLUSTERS == 10 and model.n_clusters == 10
    pred = model.predict(feats)
    assert _same_partition(pred, truth)
    tpred = model.predict(torch.from_numpy(feats).float())
    assert isinstance(tpred, torch.Tensor) and tpred.tolist() == pred.tolist()
    again = ClusterModel.from_json(model.to_json())
    assert again.predict(feats).tolist() == pred.tolist()
    with pytest.raises(ConfigError):
        ClusterModel().predict(feats)
    with pytest.raises(ConfigError):
        ClusterModel.from_json({"mean": [0.0], "std": [1.0], "components": [[1.0, 2.0]],
                                "centres": [[0.0]]})
    with pytest.raises(ConfigError):
        ClusterModel().fit(np.ones((1, 3)))


def test_cluster_weights_macro_average() -> None:
    q = np.array([0, 0, 0, 1, 2, 2])
    w = cluster_weights(q)
    assert w.tolist() == pytest.approx([1 / 9] * 3 + [1 / 3] + [1 / 6] * 2)
    assert w.sum() == pytest.approx(1.0)
    tw = cluster_weights(torch.tensor(q))
    assert torch.allclose(tw, torch.tensor(w, dtype=torch.float32))
    logits = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 0, 1, 1, 0])
    loss = cluster_weighted_cross_entropy(logits, target, torch.tensor(q))
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    expected = (ce[:3].mean() + ce[3] + ce[4:].mean()) / 3
    assert loss.item() == pytest.approx(expected.item())


_atoms = st.one_of(st.none(), st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=2))
_values = st.recursive(_atoms, lambda inner: st.lists(inner, max_size=4), max_leaves=12)


@given(st.dictionaries(st.sampled_from(["mean", "std", "components", "centres", "explained"]),
                       _values))
@settings(max_examples=200, deadline=None)
def test_fuzz_cluster_model_reader(data: dict[str, object]) -> None:
    try:
        model = ClusterModel.from_json(data)
    except QpsegError:
        return
    assert model.n_clusters >= 0

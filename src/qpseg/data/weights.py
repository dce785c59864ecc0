"""Loss weights: ho2021 class weights and pedersen2022 cluster weights.

* :func:`ho_class_weights`: ho2021 §2.5 eq. (2), ``w_c = 1 - N_c / Σ_c N_c`` with ``N_c`` the
  number of class-``c`` pixels in the training set (:func:`class_pixel_counts` sums the tile
  histograms, elastic copies included).
* :class:`ClusterModel`: pedersen2022 §2.3: features are standardised (z-score), reduced by PCA
  to the components that explain 95 % of the variance, and clustered by k-means with k = 10.
  Implemented in numpy (scikit-learn is only a test dependency); ``predict`` also takes torch
  tensors (on any device) so the frozen clustering can run inside the training step.
* :func:`cluster_weights` / :func:`cluster_weighted_cross_entropy`: pedersen2022 §2.4 eq. (1),
  the cross-entropy computed per cluster and macro-averaged over the clusters in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from qpseg.errors import ConfigError, LabelError

if TYPE_CHECKING:
    import torch

    from qpseg.data.grid import Tile

__all__ = [
    "N_CLUSTERS",
    "PCA_VARIANCE",
    "ClusterModel",
    "class_pixel_counts",
    "cluster_weighted_cross_entropy",
    "cluster_weights",
    "ho_class_weights",
    "kmeans",
    "pca_fit",
]

#: pedersen2022 §2.3: "the number of principal components was chosen such that 95% of the
#: variance of the data was explained"; "k-means ... using k = 10 number of clusters".
PCA_VARIANCE = 0.95
N_CLUSTERS = 10


def class_pixel_counts(tiles: Sequence[Tile], n_classes: int) -> np.ndarray:
    """``N_c``: labelled pixels per class summed over tile histograms (a tile listed twice,
    e.g. an elastic copy, counts twice)."""
    counts = np.zeros(n_classes, dtype=np.float64)
    for t in tiles:
        h = np.asarray(t.class_hist[:n_classes], dtype=np.float64)
        counts[: len(h)] += h
    return counts


def ho_class_weights(counts: Sequence[float] | np.ndarray) -> np.ndarray:
    """ho2021 eq. (2): ``w_c = 1 - N_c / Σ N_c``; raises LabelError when no pixel is labelled."""
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or not np.isfinite(n).all() or (n < 0).any():
        raise LabelError(f"class pixel counts must be finite and >= 0, got {counts!r}")
    total = n.sum()
    if total <= 0:
        raise LabelError("no labelled pixels: class weights are undefined")
    result: np.ndarray = 1.0 - n / total
    return result


# ------------------------------------------------------------------------------- clustering
def pca_fit(x: np.ndarray, variance: float = PCA_VARIANCE) -> tuple[np.ndarray, np.ndarray]:
    """PCA of centred data ``x`` (n, d): ``(components (k, d), explained_ratio (k,))`` with the
    fewest components whose explained variance reaches ``variance``. Component signs are fixed
    (largest-magnitude loading positive) so results are reproducible."""
    if not 0 < variance <= 1:
        raise ConfigError(f"variance must be in (0, 1], got {variance}")
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    var = s**2
    total = var.sum()
    if total <= 0:
        return vt[:1], np.array([1.0])
    ratio = var / total
    k = int(np.searchsorted(np.cumsum(ratio), variance - 1e-12) + 1)
    k = min(k, len(ratio))
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    signs[signs == 0] = 1
    return comps * signs[:, None], ratio[:k]


def kmeans(
    x: np.ndarray, k: int = N_CLUSTERS, *, seed: int = 0, n_init: int = 4, max_iter: int = 300,
    tol: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray, float]:
    """k-means (Lloyd) with k-means++ seeding, best of ``n_init``: ``(centres, labels,
    inertia)``. ``k`` larger than the number of distinct points is reduced to it."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n == 0:
        raise ConfigError("k-means needs at least one point")
    k = max(1, min(int(k), len(np.unique(x, axis=0))))
    rng = np.random.default_rng(seed)
    best: tuple[np.ndarray, np.ndarray, float] | None = None
    sq = (x**2).sum(1)
    for _ in range(max(1, n_init)):
        centres = [x[rng.integers(n)]]
        d2 = ((x - centres[0]) ** 2).sum(1)
        for _ in range(1, k):
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
            c = x[rng.choice(n, p=p)]
            centres.append(c)
            d2 = np.minimum(d2, ((x - c) ** 2).sum(1))
        cent = np.array(centres)
        labels = np.zeros(n, dtype=np.int64)
        for _ in range(max_iter):
            dist = sq[:, None] - 2 * x @ cent.T + (cent**2).sum(1)[None, :]
            labels = dist.argmin(1)
            new = np.array([x[labels == j].mean(0) if (labels == j).any() else cent[j]
                            for j in range(k)])
            shift = float(((new - cent) ** 2).sum())
            cent = new
            if shift <= tol:
                break
        dist = sq[:, None] - 2 * x @ cent.T + (cent**2).sum(1)[None, :]
        labels = dist.argmin(1)
        inertia = float(np.maximum(dist[np.arange(n), labels], 0).sum())
        if best is None or inertia < best[2]:
            best = (cent, labels, inertia)
    assert best is not None
    return best


@dataclass
class ClusterModel:
    """pedersen2022 §2.3: z-score -> PCA (95 % variance) -> k-means (k = 10).

    ``fit(features)`` on an ``(n, d)`` feature matrix (e.g. VGG-16 features of 100 batches of
    32 patches); ``predict`` returns cluster indices for numpy arrays or torch tensors.
    """

    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    components: np.ndarray | None = None
    centres: np.ndarray | None = None
    explained: np.ndarray | None = None

    def fit(self, features: Any, *, k: int = N_CLUSTERS, variance: float = PCA_VARIANCE,
            seed: int = 0) -> ClusterModel:
        """Fit the three stages; returns self."""
        x = _as_numpy(features)
        if x.ndim != 2 or len(x) < 2:
            raise ConfigError(f"features must be (n >= 2, d), got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ConfigError("features must be finite")
        self.mean = x.mean(0)
        std = x.std(0)
        self.std = np.where(std > 1e-12, std, 1.0)
        z = (x - self.mean) / self.std
        self.components, self.explained = pca_fit(z, variance)
        self.centres, _, _ = kmeans(z @ self.components.T, k, seed=seed)
        return self

    @property
    def n_clusters(self) -> int:
        """Number of clusters (0 before fitting)."""
        return 0 if self.centres is None else len(self.centres)

    def transform(self, features: Any) -> Any:
        """z-score and PCA projection (numpy in -> numpy out, torch in -> torch out)."""
        if self.mean is None or self.std is None or self.components is None:
            raise ConfigError("ClusterModel is not fitted")
        if _is_torch(features):
            import torch

            t: torch.Tensor = features
            dev, dt = t.device, t.dtype if t.is_floating_point() else torch.float32
            m = torch.as_tensor(self.mean, device=dev, dtype=dt)
            s = torch.as_tensor(self.std, device=dev, dtype=dt)
            c = torch.as_tensor(self.components, device=dev, dtype=dt)
            return ((t.to(dt) - m) / s) @ c.T
        x = _as_numpy(features)
        return ((x - self.mean) / self.std) @ self.components.T

    def predict(self, features: Any) -> Any:
        """Nearest cluster centre of every row (int64; torch in -> torch out)."""
        if self.centres is None:
            raise ConfigError("ClusterModel is not fitted")
        z = self.transform(features)
        if _is_torch(z):
            import torch

            c = torch.as_tensor(self.centres, device=z.device, dtype=z.dtype)
            return torch.cdist(z, c).argmin(1)
        d = ((z[:, None, :] - self.centres[None]) ** 2).sum(-1)
        result: np.ndarray = d.argmin(1).astype(np.int64)
        return result

    def to_json(self) -> dict[str, Any]:
        """JSON form (stored in a model package)."""
        if self.centres is None or self.mean is None or self.std is None \
                or self.components is None:
            raise ConfigError("ClusterModel is not fitted")
        return {"mean": self.mean.tolist(), "std": self.std.tolist(),
                "components": self.components.tolist(), "centres": self.centres.tolist(),
                "explained": None if self.explained is None else self.explained.tolist()}

    @classmethod
    def from_json(cls, data: Any) -> ClusterModel:
        """Inverse of :meth:`to_json`; raises ConfigError when malformed."""
        try:
            mean = np.asarray(data["mean"], dtype=np.float64)
            std = np.asarray(data["std"], dtype=np.float64)
            comps = np.asarray(data["components"], dtype=np.float64)
            centres = np.asarray(data["centres"], dtype=np.float64)
            if mean.ndim != 1:
                raise ValueError("mean must be a list of numbers")
            d = mean.shape[0]
            if (std.shape != (d,) or comps.ndim != 2 or comps.shape[1] != d
                    or centres.ndim != 2 or centres.shape[1] != comps.shape[0]):
                raise ValueError("inconsistent shapes")
            if not all(np.isfinite(a).all() for a in (mean, std, comps, centres)):
                raise ValueError("values must be finite")
            exp = data.get("explained")
            return cls(mean, std, comps, centres,
                       None if exp is None else np.asarray(exp, dtype=np.float64))
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise ConfigError(f"malformed cluster model: {exc}") from None


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _as_numpy(x: Any) -> np.ndarray:
    if _is_torch(x):
        return np.asarray(x.detach().cpu().double().numpy())
    return np.asarray(x, dtype=np.float64)


def cluster_weights(clusters: Any) -> Any:
    """Per-sample weights of pedersen2022 eq. (1) read as a macro average over clusters:
    ``1 / (K_b * n_k)`` for a sample in cluster ``k`` with ``n_k`` members among the ``K_b``
    clusters present in the batch; they sum to 1. numpy or torch (same type back)."""
    if _is_torch(clusters):
        import torch

        q: torch.Tensor = clusters
        _, inverse, counts = torch.unique(q, return_inverse=True, return_counts=True)
        return 1.0 / (len(counts) * counts[inverse].to(torch.float32))
    c = np.asarray(clusters)
    _, inv, counts = np.unique(c, return_inverse=True, return_counts=True)
    result: np.ndarray = 1.0 / (len(counts) * counts[inv].astype(np.float64))
    return result


def cluster_weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                   clusters: torch.Tensor) -> torch.Tensor:
    """pedersen2022 §2.4 CWCE loss for patch classification: the mean cross-entropy of each
    cluster in the batch, averaged over those clusters. ``logits`` (B, C), ``target`` (B,),
    ``clusters`` (B,)."""
    import torch.nn.functional as F

    ce = F.cross_entropy(logits, target, reduction="none")
    w = cluster_weights(clusters).to(ce.dtype)
    return (ce * w).sum()

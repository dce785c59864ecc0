"""qpseg: QuPath projects to segmentation labels, models, whole-slide predictions and metrics."""

__version__ = "0.1.0"
__all__ = ["__version__"]

"""The parts behind :mod:`qpseg.slide`, one job per module; import from :mod:`qpseg.slide`.

``pixel_size`` (the plausibility check and the one pixel-size rule), ``base`` (the
:class:`~qpseg.slide.Slide` interface: metadata, QuPath coordinates, resampled reads), one module
per backend (``openslide_backend``, ``tifffile_backend``, ``pillow_backend``; the last two share
``plain``, the one-level :class:`~qpseg.slide.ImageSlide`) and ``opener`` (:func:`open_slide`,
which picks the backend).
"""

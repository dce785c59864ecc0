"""``qpseg evaluate``: match truth and prediction slides, score them, write CSVs and a report.

Inputs (truth ``T`` and prediction ``P`` are each one of):

* **a QuPath project** (``project.qpproj`` or its folder). As truth: the annotations exported
  by ``groovy/export_annotations.groovy`` to ``<project>/qpseg/annotations/``; as prediction:
  ``<project>/qpseg/predictions/`` (what ``qpseg infer`` writes). Files are found per entry as
  ``<entryID>.geojson`` or ``<imageName>.geojson`` (:func:`qpseg.manifest.find_annotation_file`).
  The image size comes from the project's image metadata.
* **a folder of GeoJSON files** (``*.geojson``, ``*.geojson.gz``, ``*.json``; names ending in
  ``metadata.json`` and ``manifest.json``/``classes.json``/``config.json`` are skipped), one per
  slide, named ``<slide>.geojson``. Coordinates are level-0 pixels; ``--mpp`` gives their size.
* **a folder of label masks** (``*.png``, ``*.tif``, ``*.tiff``): ``<slide>.png`` or
  ``<slide>_labels.png`` hold *class indices* (uint8/uint16; 0 = Background, ``i`` = the
  ``i``-th name of ``--classes``, 255 = unlabelled); ``<slide>_instances.tif`` holds *instance
  ids* (any integer type, 0 = no instance). A mask covers the whole slide on a grid of
  ``--mask-mpp`` µm/px (default: deduced from the slide size when known, else level 0).
* a single GeoJSON file or mask (two single files always match each other).

Mask values: in a truth class mask 255 is unlabelled and 0 is labelled Background; in a
prediction class mask 255 ("not predicted") counts as Background. Without ``--classes`` two mask
inputs are compared on numbered classes ("class 1", ...); a mask against GeoJSON needs
``--classes``. Label masks carry no pixel size: lesion diameters need ``--mask-mpp`` (or
``--mpp``, or a project that gives the slide's size and pixel size).

Pixel size (level-0 µm/px) of a matched slide: the rule of every command,
:func:`qpseg.slide.choose_pixel_size` — the slide's own (a project entry's image, truth side
first), else the QuPath project's calibration, else ``--mpp``; ``--mpp-override`` makes
``--mpp`` replace a known value (``slides.csv`` records where each value came from in
``mpp_source`` and what was replaced in ``mpp_replaced``). ``--mpp``, ``--eval-mpp`` and
``--mask-mpp`` are checked by :func:`qpseg.slide.check_mpp`.

Matching: every slide has keys — a project entry its image name (with and without the image
extension, e.g. ``a.svs`` and ``a``) and its entry id; a file its stem (``a.svs.geojson`` ->
``a.svs`` and ``a``; an all-digit stem is also an entry id). Keys are compared case-insensitively,
entry ids first, then names. Entry ids are only compared between a project and a folder, or
within one project (two different projects are matched by image name only). Truth and
prediction slides without a partner are listed in ``unmatched.csv`` (not an error); nothing
matching at all is a :class:`~qpseg.errors.ConfigError`.

What is scored (per slide):

* **Pixels** — truth annotations are rasterised with :func:`qpseg.labels.rasterize_labels` (the
  label rules: ``Ignore*`` annotations carry no label, ``Region*`` marks exhaustively labelled
  area that is Background where no class is drawn), predictions with the same function;
  unpredicted pixels are Background. Pixel objects of either side are its classified
  annotations, or, where it has none, its classified detections and cells (a cell's nucleus
  geometry when it has one): a cells-only truth is pixel truth too. ``--truth-mode`` says what
  an unannotated truth pixel is:

  - ``exhaustive`` (the default, the papers' protocol: an untrained model painting everything
    must not score 1.0): Background, over the **whole image** (not a tissue mask: glass
    painted as a class counts against the model). A slide whose truth has ``Region*``
    annotations keeps them as the bound of its exhaustive area. A truth file without any
    annotation (a benign slide, or one holding only AI objects the review rule leaves out)
    is scored as all-negative: its predicted pixels are false positives and its predicted
    lesions lesion-level false positives. Without a known image size (GeoJSON folders) the
    whole image is the bounding box of the truth's and the prediction's objects.
  - ``partial``: unlabelled (not scored); only the truth's labelled area is scored, and a
    truth without labelled annotations or instances is listed as unmatched. A warning says
    when the truth looks exhaustive by intent (one class, no ``Region*``) in this mode.

  Both are drawn at ``--eval-mpp`` (default: the finest pixel size the matched predictions
  record in their provenance, ``qpseg_map_mpp`` / ``qpseg_mpp``, else
  :data:`DEFAULT_EVAL_MPP` = 2 µm/px) over the image (exhaustive) or the bounding box of the
  truth's labelled area grown to whole predicted objects touching it (partial), on a grid
  aligned to multiples of the eval pixel from the image origin. A raster above
  ``_FULL_RASTER_PIXELS`` is scored tile by tile (the confusion matrix at the eval pixel
  size; lesions and the overlay on a grid coarsened to fit, noted per slide). With a
  label-mask side, the mask's own grid is used instead (a truth mask says itself what is
  unlabelled: 255).
* **Lesions** (CAMELYON-style, :mod:`qpseg.metrics.lesion`) of one class: ``--lesion-class``,
  by default the first class (in class order) named Tumor, Tumour or Metastasis; predicted
  lesions outside the labelled area are left out.
* **Instances** (:mod:`qpseg.metrics.instance`) when the truth holds detections or cells (or an
  instance mask): truth and predicted detections/cells (a cell's nucleus geometry when it has
  one). Geometry against geometry is scored on the polygons themselves (exact areas, no raster);
  a mask side on its grid. If the truth has ``Region*`` annotations, only instances whose
  interior point lies inside them are scored. Instance metrics are class-agnostic. AJI is
  reported pooled over slides (sums over every slide) and as the per-image mean (the nuclei
  papers' protocol); a warning says when the prediction of a slide with truth instances holds
  no detections or cells (annotations cannot be instances: every truth instance is missed).

Classes: ``--classes`` fixes them (Background is index 0); objects of other classes are dropped
with a warning (truth: unlabelled; prediction: Background). Otherwise the classes are those of
the truth (in the truth project's ``classes.json`` order, then alphabetical), and a prediction
class the truth never uses is an error (:class:`~qpseg.errors.LabelError`: the classes
disagree). Class means (mIoU, ...) average over the classes present in the truth of at least one
slide.

A slide that cannot be scored (unreadable file, unknown pixel size, ...) is listed in
``failed.csv`` with its reason and the others are still scored; in partial mode a truth
without labelled annotations or instances is listed as unmatched (its AI-object counts are
still reported). Every CSV of scores has a ``truth_mode`` column. Outputs (see
:meth:`Evaluation.write`):
``per_slide.csv``, ``slides.csv``, ``summary.csv``, ``confusion.csv``, ``lesions.csv`` and
``lesion_slides.csv`` (lesion class present), ``instances.csv`` (instance data present),
``unmatched.csv``, ``failed.csv`` and ``report.html``. In the CSVs an empty cell is an undefined
value (``NaN``: a ratio with a zero denominator).
"""


from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from qpseg.errors import ConfigError, LabelError, QpsegError, QpsegWarning
from qpseg.evaluation.inputs import (
    GEOJSON_SUFFIXES as GEOJSON_SUFFIXES,
)
from qpseg.evaluation.inputs import (
    MASK_SUFFIXES as MASK_SUFFIXES,
)
from qpseg.evaluation.inputs import (
    MAX_RASTER_PIXELS as MAX_RASTER_PIXELS,
)
from qpseg.evaluation.inputs import (
    EvalInput,
    Failed,
    InputItem,
    Unmatched,
    display_name,
    load_input,
    match_inputs,
    read_label_mask,
)
from qpseg.evaluation.inputs import (
    InputKind as InputKind,
)
from qpseg.evaluation.provenance import (
    ModelInfo as ModelInfo,
)
from qpseg.evaluation.provenance import (
    _auto_eval_mpp,
    model_info,
)
from qpseg.evaluation.provenance import (
    provenance_mpp as provenance_mpp,
)
from qpseg.evaluation.raster import _class_key
from qpseg.evaluation.results import (
    AI_OBJECT_COLUMNS as AI_OBJECT_COLUMNS,
)
from qpseg.evaluation.results import (
    CONFUSION_COLUMNS as CONFUSION_COLUMNS,
)
from qpseg.evaluation.results import (
    FAILED_COLUMNS as FAILED_COLUMNS,
)
from qpseg.evaluation.results import (
    PER_SLIDE_COLUMNS,
    SUMMARY_COLUMNS,
    Evaluation,
    bootstrap_ci,
    write_csv,
)
from qpseg.evaluation.results import (
    SLIDE_COLUMNS as SLIDE_COLUMNS,
)
from qpseg.evaluation.results import (
    UNMATCHED_COLUMNS as UNMATCHED_COLUMNS,
)
from qpseg.evaluation.scoring import (
    DEFAULT_EVAL_MPP,
    DEFAULT_TRUTH_MODE,
    LESION_CLASS_NAMES,
    TRUTH_MODES,
    SlideScore,
    _Options,
    _pixel_size_option,
)
from qpseg.evaluation.workers import _score_all
from qpseg.evaluation.workers import usable_cpus as usable_cpus
from qpseg.labels import BACKGROUND, ClassMap

if TYPE_CHECKING:
    import numpy as np


__all__ = [
    "DEFAULT_EVAL_MPP",
    "LESION_CLASS_NAMES",
    "PER_SLIDE_COLUMNS",
    "SUMMARY_COLUMNS",
    "EvalInput",
    "Evaluation",
    "Failed",
    "InputItem",
    "SlideScore",
    "Unmatched",
    "bootstrap_ci",
    "evaluate",
    "load_input",
    "match_inputs",
    "read_label_mask",
    "write_csv",
]


def _global_classes(scores: Sequence[SlideScore], truth: EvalInput,
                    opts: _Options) -> tuple[str, ...]:
    """The evaluated class list (Background first); LabelError when the classes disagree."""
    if opts.classes is not None:
        return tuple(ClassMap.from_names(opts.classes).names)
    if truth.kind == "masks":  # masks on both sides without --classes: numbered classes
        top = max((len(s.class_names) for s in scores), default=1)
        return tuple(ClassMap.from_names([f"class {i}" for i in range(1, top)]).names)
    found: dict[str, str] = {}
    for s in scores:
        for n in s.truth_classes:
            found.setdefault(_class_key(n), n)
    order = {_class_key(n): i for i, n in enumerate(truth.class_order)}
    names = sorted(found.values(), key=lambda n: (order.get(_class_key(n), len(order)),
                                                  n.lower()))
    extra: dict[str, list[str]] = {}
    for s in scores:
        for n in s.pred_classes:
            if _class_key(n) not in found and _class_key(n) != _class_key(BACKGROUND):
                extra.setdefault(n, []).append(s.slide)
    if extra:
        shown = ", ".join(f"{n!r} (e.g. slide {v[0]!r})" for n, v in list(extra.items())[:5])
        raise LabelError(
            f"classes disagree: the prediction uses {shown}, which the truth never uses "
            f"(truth classes: {', '.join(names) or 'none'}); pass --classes to choose the "
            "classes to evaluate")
    return tuple(ClassMap.from_names(names).names)


def _embed(score: SlideScore, names: Sequence[str]) -> np.ndarray:
    """The slide's confusion matrix in the global class order."""
    import numpy as np

    assert score.confusion is not None
    pos = {_class_key(n): i for i, n in enumerate(names)}
    k = len(names)
    out = np.zeros((k, k), dtype=np.int64)
    idx = [pos.get(_class_key(n), -1) for n in score.class_names]
    for i, gi in enumerate(idx):
        for j, gj in enumerate(idx):
            if gi >= 0 and gj >= 0:
                out[gi, gj] += score.confusion[i, j]
            elif gi >= 0 and score.confusion[i, j]:
                # a prediction class outside the evaluated classes: counted as Background
                out[gi, 0] += score.confusion[i, j]
    return out


def evaluate(
    truth: str | os.PathLike[str],
    pred: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    classes: Sequence[str] | None = None,
    mpp: float | None = None,
    eval_mpp: float | None = None,
    mask_mpp: float | None = None,
    lesion_class: str | None = None,
    instances: bool | None = None,
    report: bool = True,
    truth_mode: str = DEFAULT_TRUTH_MODE,
    seed: int = 0,
    n_bootstrap: int = 2000,
    workers: int = 1,
    ai_objects: str = "unreviewed-out",
    mpp_override: bool = False,
    model: str | os.PathLike[str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Evaluation:
    """Score predictions ``pred`` against ``truth`` slide by slide (see the module doc).

    ``classes``: class names to evaluate (default: the truth's). ``mpp``: level-0 µm/px of
    slides with no pixel size of their own or in the project (needed for GeoJSON folders);
    ``mpp_override`` makes it replace every known value (module doc; the replacements are in
    :attr:`Evaluation.mpp_changes`, and a warning says once when ``mpp`` differs from values it
    does not replace). ``eval_mpp``: pixel size of the evaluation raster (None: the finest pixel
    size the matched predictions record in their provenance, else :data:`DEFAULT_EVAL_MPP`;
    which one is in :attr:`Evaluation.eval_mpp_source`). ``truth_mode``: ``exhaustive``
    (unannotated pixels are Background, slides without annotations are all-negative) or
    ``partial`` (only the truth's labelled area is scored); see the module doc. ``mask_mpp``:
    pixel size of label masks. ``lesion_class``: class of the lesion metrics (default
    Tumor/Tumour/Metastasis when present; ``"none"`` or ``""`` turns them off). ``instances``:
    False skips instance metrics. ``seed`` and ``n_bootstrap`` set the bootstrap CIs.
    ``workers``: processes scoring slides in parallel (0: one per usable CPU from 4 slides on);
    the results do not depend on it. With ``out_dir`` the CSVs (and ``report.html`` unless
    ``report`` is False) are written there; it is checked to be writable before any slide is
    scored. ``ai_objects``: which AI objects of the truth count (:mod:`qpseg.review`:
    ``unreviewed-out``, ``all-out``, ``all-in``); the counts are in ``Evaluation.review`` and
    ``ai_objects.csv``. ``model``: the model package that made the predictions (default: the
    one their folder's ``run_metadata.json`` records): its training split marks the slides it
    was trained on (:attr:`Evaluation.model`). ``progress(done, total, slide)`` is called
    before the first slide and after each one.

    Raises :class:`ConfigError` when nothing matches or an option is invalid,
    :class:`LabelError` when the classes disagree, and a :class:`QpsegError` when no slide could
    be scored. Slides that fail are listed in ``Evaluation.failed``.
    """
    cls_list: tuple[str, ...] | None = None
    if classes is not None:
        cls_list = tuple(c.strip() for c in classes if c and c.strip())
        if not cls_list:
            raise ConfigError("--classes names no class")
        ClassMap.from_names(cls_list)  # raises LabelError for Ignore*/Region*/duplicates
    les: str | None = lesion_class
    if les is not None:
        les = les.strip()
        if les.lower() in ("none", "off", ""):
            les = ""
    from qpseg.review import check_policy

    if truth_mode not in TRUTH_MODES:
        raise ConfigError(f"--truth-mode must be one of {', '.join(TRUTH_MODES)}, not "
                          f"{truth_mode!r}")
    given_eval_mpp = _pixel_size_option(eval_mpp, "--eval-mpp")
    opts = _Options(
        ai_objects=check_policy(ai_objects), truth_mode=truth_mode,
        classes=cls_list, mpp=_pixel_size_option(mpp, "--mpp"),
        eval_mpp=given_eval_mpp or DEFAULT_EVAL_MPP,
        mask_mpp=_pixel_size_option(mask_mpp, "--mask-mpp"), lesion_class=les,
        instances=instances, thumbnails=report, mpp_override=bool(mpp_override),
    )
    if opts.mpp_override and opts.mpp is None:
        raise ConfigError("--mpp-override needs --mpp (the pixel size that replaces the "
                          "slides' own)")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ConfigError(f"--workers must be a whole number >= 0, not {workers!r}")
    if not isinstance(n_bootstrap, int) or n_bootstrap < 0:
        raise ConfigError(f"number of bootstrap resamples must be >= 0, not {n_bootstrap}")
    if les and cls_list is not None and ClassMap.from_names(cls_list).index_of(les) is None:
        raise ConfigError(f"lesion class {les!r} is not among --classes ({', '.join(cls_list)})")

    t_in = load_input(truth, "truth")
    p_in = load_input(pred, "pred")
    if "masks" in (t_in.kind, p_in.kind) and t_in.kind != p_in.kind and cls_list is None:
        raise ConfigError("label masks hold class indices: pass --classes to name them "
                          "(index 1 = the first class)")
    if opts.mpp is None and t_in.kind == p_in.kind == "geojson":
        raise ConfigError("GeoJSON inputs need the pixel size: pass --mpp (µm per level-0 "
                          "pixel)")
    pairs, unmatched = match_inputs(t_in, p_in)
    if not pairs:
        t_keys = ", ".join([i.name for i in t_in.items if i.has_data][:3]) or "none"
        p_keys = ", ".join([i.name for i in p_in.items if i.has_data][:3]) or "none"
        raise ConfigError(f"nothing matches: no prediction matches a truth slide by entry id or "
                          f"image name (truth: {t_keys}; prediction: {p_keys})", t_in.path)
    if out_dir is not None:  # before the slides are scored (the long part)
        from qpseg._io import ensure_writable_dir

        ensure_writable_dir(out_dir)
    info = model_info([p for _, p in pairs], p_in, model)  # a bad --model fails here
    if given_eval_mpp is not None:
        eval_mpp_source = "--eval-mpp"
    else:
        opts.eval_mpp, eval_mpp_source = _auto_eval_mpp(pairs, p_in)

    scores: list[SlideScore] = []
    unscored: list[SlideScore] = []
    failed: list[Failed] = []
    jobs = [(t, p, t_in.kind, p_in.kind, opts) for t, p in pairs]
    done = 0
    if progress is not None:
        progress(0, len(jobs), "")
    for (t, p), (outcome, caught) in zip(pairs, _score_all(jobs, workers), strict=True):
        for category, message in caught:  # a worker's warnings, said here as if said here
            warnings.warn(message, category, stacklevel=2)
        done += 1
        if progress is not None:
            progress(done, len(jobs), display_name(t, p))
        if isinstance(outcome, str):
            failed.append(Failed(display_name(t, p), t.entry_id, t.files, p.files, outcome))
            continue
        score = outcome
        if score.confusion is None and score.instance is None:
            what = ("truth holds only AI objects left out by --ai-objects"
                    if score.review is not None and score.review.total("left_out")
                    else "truth has no labelled annotations or instances")
            unmatched.append(Unmatched("truth", display_name(t, p), t.files, what))
            unscored.append(score)  # its AI-object counts are still reported
            continue
        scores.append(score)
    if not scores:
        if failed:
            raise QpsegError(f"no slide could be scored ({len(failed)} failed); first: "
                             f"{failed[0].slide}: {failed[0].reason}")
        raise LabelError("no matched slide has labelled annotations or instances in the truth",
                         t_in.path)

    names = _global_classes(scores, t_in, opts)
    notes: list[str] = []
    pixel_scored = [s for s in scores if s.confusion is not None]
    if (opts.truth_mode == "partial" and len(names) == 2 and pixel_scored
            and t_in.kind != "masks" and not any(s.has_region for s in pixel_scored)):
        msg = (f"the truth looks exhaustive ({names[1]} only, no Region* annotations) but "
               "--truth-mode partial scores only inside its outlines: a model that paints "
               f"{names[1]} everywhere scores 1.0; use --truth-mode exhaustive unless the "
               "unannotated tissue was not checked")
        notes.append(msg)
        warnings.warn(msg, QpsegWarning, stacklevel=2)
    blind = [s.slide for s in scores if s.instance is not None and s.pred_instances is False]
    if blind:
        msg = (f"instance metrics of {len(blind)} slide(s) (e.g. {blind[0]}) score a "
               "prediction that holds no detections or cells: every truth instance counts "
               "as missed (AJI 0); predict them with `qpseg infer --as detections` or "
               "`--as cells`")
        notes.append(msg)
        warnings.warn(msg, QpsegWarning, stacklevel=2)
    unused = [s for s in scores if s.mpp_given_unused]
    if unused and opts.mpp is not None:
        shown = "; ".join(f"{s.slide} {s.base_mpp:g} µm/px from the {s.mpp_source}"
                          for s in unused[:3])
        msg = (f"--mpp {opts.mpp:g} is not used for {len(unused)} slide(s) with a pixel size of "
               f"their own ({shown}{'; ...' if len(unused) > 3 else ''}); pass --mpp-override "
               "to replace it")
        notes.append(msg)
        warnings.warn(msg, QpsegWarning, stacklevel=2)
    if opts.classes is not None:
        dropped = sorted({n for s in scores for n in s.pred_classes
                          if _class_key(n) not in {_class_key(c) for c in names}})
        if dropped:
            msg = (f"predicted classes not among --classes counted as Background: "
                   f"{', '.join(dropped)}")
            notes.append(msg)
            warnings.warn(msg, QpsegWarning, stacklevel=2)
        t_dropped = sorted({n for s in scores for n in s.truth_classes
                            if _class_key(n) not in {_class_key(c) for c in names}})
        if t_dropped:
            msg = f"truth classes not among --classes left unlabelled: {', '.join(t_dropped)}"
            notes.append(msg)
            warnings.warn(msg, QpsegWarning, stacklevel=2)

    from qpseg.metrics.instance import InstanceAccumulator
    from qpseg.metrics.lesion import LesionAccumulator, LesionMetrics
    from qpseg.metrics.pixel import PixelAccumulator

    pix_scores = [s for s in scores if s.confusion is not None]
    confusions = [_embed(s, names) for s in pix_scores]
    present = sorted({i for cm in confusions for i in range(len(names)) if cm[i].sum() > 0})
    pixel = PixelAccumulator(classes=names, mean_classes=present or None, pred_ignore=0)
    for s, cm in zip(pix_scores, confusions, strict=True):
        pixel.add_confusion(cm, slide=s.slide)

    chosen: str | None = None
    if opts.lesion_class:
        chosen = next((n for n in names if _class_key(n) == _class_key(opts.lesion_class)), None)
        if chosen is None:
            raise ConfigError(f"lesion class {opts.lesion_class!r} is not an evaluated class "
                              f"({', '.join(names)})")
    elif opts.lesion_class is None:
        wanted = {n.lower() for n in LESION_CLASS_NAMES}
        chosen = next((n for n in names if n.lower() in wanted), None)
    lesion = None
    if chosen is not None:
        lesion = LesionAccumulator()
        for s in pix_scores:
            res = s.lesions.get(_class_key(chosen))
            if res is None:
                if s.eval_mpp is None:
                    continue
                res = LesionMetrics(slide=s.slide, mpp=s.eval_mpp, truth=(), pred=())
            lesion.add(res)
        if not len(lesion):
            msg = f"lesion metrics ({chosen}) skipped: the pixel size is unknown"
            notes.append(msg)
            warnings.warn(msg, QpsegWarning, stacklevel=2)
            lesion, chosen = None, None

    instance = None
    inst_scores = [s for s in scores if s.instance is not None]
    if inst_scores:
        instance = InstanceAccumulator()
        instance.per_slide.extend(s.instance for s in inst_scores if s.instance is not None)
    elif instances:
        msg = "instance metrics requested but no truth holds detections, cells or instance masks"
        notes.append(msg)
        warnings.warn(msg, QpsegWarning, stacklevel=2)

    result = Evaluation(
        truth=str(t_in.path), pred=str(p_in.path), class_names=names, eval_mpp=opts.eval_mpp,
        slides=scores, pixel=pixel, lesion_class=chosen, lesion=lesion, instance=instance,
        unmatched=unmatched, failed=failed, notes=notes, seed=seed, n_bootstrap=n_bootstrap,
        ai_objects=opts.ai_objects, truth_mode=opts.truth_mode,
        eval_mpp_source=eval_mpp_source, unscored=unscored,
        model=info,
    )
    if out_dir is not None:
        files = result.write(out_dir)
        if report:
            from qpseg.report import write_report

            files["report.html"] = write_report(result, Path(out_dir) / "report.html")
    return result

"""Edit QuPath projects the way QuPath does: create one, add slides, relink moved images.

Three operations behind ``qpseg project create/add/relink``:

* :func:`create_project` makes a project in an empty folder (QuPath's own rule: hidden files
  aside, the folder must be empty; qupath-gui-fx ``Commands.java`` v0.5.1 lines 1351-1355).
* :func:`add_slides` opens every slide first (nothing is written when one cannot be opened),
  skips a slide already in the project (same file URI) and never edits existing entries.
* :func:`relink_project` finds images that moved: for each entry whose image file is missing,
  a file of the same name under a search folder (QuPath's rule, ``UriUpdater.java`` v0.5.1
  lines 463-497: exact file name, hidden files and folders skipped), with the image size
  recorded in the project to choose among files of the same name.

Which reader QuPath uses: OpenSlide for what OpenSlide opens, Bio-Formats (``--series 0``)
for everything else. Bio-Formats entries carry image metadata only when qpseg knows what
Bio-Formats will report for the file (:func:`bioformats_layout`), because QuPath refuses
stored metadata whose pixel type or channel count differs from the image's
(``AbstractImageServer.setMetadata`` -> ``ImageServerMetadata.isCompatibleMetadata``, qupath-core
v0.5.1 lines 288-294 and 796-814; the same in v0.6.0). Pixel sizes are never guessed: a slide
without a usable pixel size is added uncalibrated, with a :class:`ProjectWarning` saying so.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

from qpseg.errors import ConfigError, OutputError, ProjectError, ProjectWarning, QpsegError
from qpseg.qupath import compat
from qpseg.qupath.project import (
    PROJECT_FILE,
    ImageMetadata,
    ProjectEntry,
    QuPathProject,
    ServerBuilder,
    resolve_image_uri,
)

__all__ = [
    "AddResult",
    "RelinkReport",
    "RelinkResult",
    "add_slides",
    "create_project",
    "describe_slide",
    "relink_project",
]

# --------------------------------------------------------------------------------------------
# Create and add
# --------------------------------------------------------------------------------------------


@dataclass
class AddResult:
    """What happened to one slide given to :func:`add_slides` / :func:`create_project`.

    ``status`` is "added" (``entry`` is the new entry) or "skipped" (already in the project:
    ``reason`` names the entry).
    """

    path: Path
    status: str
    entry: ProjectEntry | None = None
    reason: str | None = None


def describe_slide(path: str | os.PathLike[str]) -> ImageMetadata:
    """Open a slide and describe it as QuPath will (SlideError when it cannot be opened).

    Warns (:class:`ProjectWarning`) when it has no usable pixel size, which is then not
    written, and when QuPath will read the image's layout itself.
    """
    from qpseg.qupath.images import image_metadata
    from qpseg.slide import mpp_problem, open_slide

    with open_slide(path) as slide:
        meta = image_metadata(slide)
        native = slide.native_mpp
    meta.validate(Path(path))
    if native is None:
        reason = "the file records none"
    else:
        reason = next((f"the file's {p}" for p in map(mpp_problem, native) if p), "")
    if not meta.store:
        warnings.warn(f"{path}: added for Bio-Formats without image metadata (qpseg cannot "
                      "predict its layout there): QuPath reads size, channels and any pixel "
                      "size from the file", ProjectWarning, stacklevel=2)
    elif meta.mpp_x is None:
        warnings.warn(f"{path}: no usable pixel size ({reason}); added without calibration "
                      "(set it in QuPath: Image > Set pixel size)", ProjectWarning,
                      stacklevel=2)
    return meta


def _local(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.normpath(os.path.abspath(path)))


def _entry_files(project: QuPathProject) -> dict[Path, ProjectEntry]:
    """Every local image file named by an entry (its URIs as written, and where it was found)."""
    out: dict[Path, ProjectEntry] = {}
    for e in project.entries:
        for holder in _uri_holders(e.server_builder.raw):
            pure = compat.file_uri_to_pure_path(holder["uri"])
            local = compat.to_local_path(pure) if pure is not None else None
            if local is not None and local.is_absolute():
                out.setdefault(Path(os.path.normpath(local)), e)
        if e.image_path is not None:
            out.setdefault(_local(e.image_path), e)
    return out


def _plan(project: QuPathProject | None, slides: Sequence[str | os.PathLike[str]]
          ) -> list[AddResult | tuple[Path, ImageMetadata]]:
    """Skip duplicates and open every other slide (before anything is written)."""
    known = _entry_files(project) if project is not None else {}
    given: set[Path] = set()
    plan: list[AddResult | tuple[Path, ImageMetadata]] = []
    for s in slides:
        path = _local(s)
        if path in known:
            e = known[path]
            plan.append(AddResult(path, "skipped", e,
                                  f"already in the project as entry {e.entry_id} "
                                  f"({e.image_name})"))
        elif path in given:
            plan.append(AddResult(path, "skipped", None, "given more than once"))
        else:
            given.add(path)
            plan.append((path, describe_slide(path)))
    return plan


def _apply(project: QuPathProject, plan: list[AddResult | tuple[Path, ImageMetadata]]
           ) -> list[AddResult]:
    results = []
    for item in plan:
        if isinstance(item, AddResult):
            results.append(item)
        else:
            path, meta = item
            results.append(AddResult(path, "added", project.add_image(path, meta)))
    return results


def create_project(folder: str | os.PathLike[str], slides: Sequence[str | os.PathLike[str]] = ()
                   ) -> tuple[QuPathProject, list[AddResult]]:
    """Create a QuPath project in the empty (or new) ``folder`` holding ``slides``.

    Every slide is opened before anything is written; a slide given twice is added once.
    ``ProjectError`` when a project is already there, ``OutputError`` when the folder is not
    empty (hidden files aside) or cannot be written.
    """
    target = _local(folder)
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise OutputError("is not a folder (a new project needs an empty folder)", target)
        if (target / PROJECT_FILE).exists():
            raise ProjectError("a QuPath project is already here; add slides to it instead",
                               target / PROJECT_FILE)
        try:
            visible = sorted(n for n in os.listdir(target) if not n.startswith("."))
        except OSError as exc:
            raise OutputError.from_os_error(exc, target) from None
        if visible:
            raise OutputError(f"is not empty ({len(visible)} item(s), e.g. {visible[0]!r}); "
                              "QuPath creates projects in empty folders only", target)
    plan = _plan(None, slides)
    from qpseg._io import ensure_writable_dir

    ensure_writable_dir(target)
    project = QuPathProject.create(target)
    results = _apply(project, plan)
    if any(r.status == "added" for r in results):
        project.save()
    return project, results


def add_slides(project: QuPathProject, slides: Sequence[str | os.PathLike[str]]
               ) -> list[AddResult]:
    """Add ``slides`` to ``project`` and save it (when anything was added).

    A slide whose file an entry already names (its URI, or where QuPath finds it) is skipped.
    Every other slide is opened before the project changes, so one that cannot be opened
    (SlideError) leaves the project as it was. Existing entries are written back as they were
    read; only those QuPath finds through its moved-project rule get their found location as
    URI, as QuPath writes them once its "update URIs" prompt is accepted.
    """
    results = _apply(project, _plan(project, slides))
    if any(r.status == "added" for r in results):
        project.save()
    return results


# --------------------------------------------------------------------------------------------
# Relink
# --------------------------------------------------------------------------------------------

# Wrapping builders nest at most a few levels; deeper input is treated as having no more URIs.
_MAX_DEPTH = 64


def _uri_holders(node: Any, depth: int = 0) -> Iterator[dict[str, Any]]:
    """Every object with a string ``uri`` in a server builder's JSON (through wrapping
    builders and lists of builders), i.e. what QuPath's ``ServerBuilder.getURIs`` returns."""
    if depth > _MAX_DEPTH:
        return
    if isinstance(node, dict):
        if isinstance(node.get("uri"), str):
            yield node
        for key, value in node.items():
            if key != "metadata" and isinstance(value, dict | list):
                yield from _uri_holders(value, depth + 1)
    elif isinstance(node, list):
        for value in node:
            if isinstance(value, dict | list):
                yield from _uri_holders(value, depth + 1)


def _recorded_size(holder: dict[str, Any]) -> tuple[int, int] | None:
    meta = holder.get("metadata")
    if not isinstance(meta, dict):
        return None
    w, h = meta.get("width"), meta.get("height")
    ok = all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0
             and float(v).is_integer() for v in (w, h))
    return (int(w), int(h)) if ok else None  # type: ignore[arg-type]


@dataclass
class RelinkResult:
    """One entry after :func:`relink_project`.

    ``status``: "ok" (image where the project says), "moved" (found through QuPath's
    moved-project rule; its URI is updated too), "relinked" (found under the search folder),
    "not found", "ambiguous" (several files fit: ``candidates``), "wrong size" (files of that
    name exist but none has the recorded size), "remote" (not a file, e.g. OMERO).
    """

    entry_id: int
    image_name: str
    status: str
    uri: str | None
    path: Path | None = None
    candidates: list[Path] = field(default_factory=list)
    note: str | None = None

    @property
    def missing(self) -> bool:
        """True when the entry's image is still not available."""
        return self.status in ("not found", "ambiguous", "wrong size")


@dataclass
class RelinkReport:
    """What :func:`relink_project` found, per entry, and whether the project was written."""

    project: Path
    search: Path
    results: list[RelinkResult]
    written: bool

    def count(self, status: str) -> int:
        """How many entries ended with ``status``."""
        return sum(r.status == status for r in self.results)

    @property
    def missing(self) -> int:
        """Entries whose image is still not available."""
        return sum(r.missing for r in self.results)


class _Index:
    """File names under the search folder (hidden files and folders skipped, as QuPath does;
    UriUpdater.java v0.5.1 line 477), walked once for the names that are wanted."""

    def __init__(self, root: Path, names: set[str]) -> None:
        self.exact: dict[str, list[Path]] = {}
        self.folded: dict[str, list[Path]] = {}
        folded = {n.casefold() for n in names}
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                if f.startswith("."):
                    continue
                if f in names or f.casefold() in folded:
                    p = Path(dirpath) / f
                    if not p.is_file():
                        continue
                    if f in names:
                        self.exact.setdefault(f, []).append(p)
                    self.folded.setdefault(f.casefold(), []).append(p)

    def find(self, name: str, windows: bool) -> list[Path]:
        """Files named ``name``; for a Windows path (case-insensitive there) any case."""
        found = self.exact.get(name, [])
        if not found and windows:
            found = self.folded.get(name.casefold(), [])
        return list(found)


def _sizes(path: Path) -> tuple[set[tuple[int, int]], str | None]:
    """The sizes QuPath may have recorded for the image (file and bounds size), or why not."""
    from qpseg.slide import open_slide

    try:
        with open_slide(path) as s:
            return {s.dimensions, s.qupath_dimensions}, None
    except QpsegError as exc:
        return set(), exc.message


def _choose(name: str, candidates: list[Path], expected: tuple[int, int] | None, search: Path
            ) -> tuple[str, Path | None, list[Path], str | None]:
    """(status, chosen file, candidates, note) for one missing image."""
    if not candidates:
        return "not found", None, [], f"no file named {name!r} under {search}"
    if expected is None:
        if len(candidates) == 1:
            return "relinked", candidates[0], candidates, \
                "matched by name only (the project records no image size)"
        return "ambiguous", None, candidates, \
            f"{len(candidates)} files named {name!r} and no recorded size to choose"
    checked = [(c, *_sizes(c)) for c in candidates]
    fits = [c for c, sizes, _ in checked if expected in sizes]
    unreadable = [(c, err) for c, sizes, err in checked if err is not None]
    want = f"{expected[0]}x{expected[1]}"
    if len(fits) == 1:
        return "relinked", fits[0], candidates, None
    if fits:
        return "ambiguous", None, fits, f"{len(fits)} files named {name!r} of size {want}"
    if len(candidates) == 1 and unreadable:
        return "relinked", candidates[0], candidates, \
            f"size not checked (qpseg cannot read it: {unreadable[0][1]})"
    if unreadable:
        return "ambiguous", None, candidates, \
            f"{len(candidates)} files named {name!r}, some qpseg cannot read to compare sizes"
    seen = ", ".join(f"{c} is {'/'.join(f'{w}x{h}' for w, h in sorted(s))}"
                     for c, s, _ in checked)
    return "wrong size", None, candidates, f"the project records {want}; {seen}"


def relink_project(project: QuPathProject, search: str | os.PathLike[str], *,
                   dry_run: bool = False) -> RelinkReport:
    """Find the missing images of ``project`` under the folder ``search`` and save the project.

    An entry's image is looked up where its URI says, then by QuPath's moved-project rule,
    then by file name anywhere under ``search`` (choosing by the recorded image size among
    files of the same name). Found files replace the URIs in the entry's server builder, every
    other builder field (reader, ``args``, metadata, wrapping builders) kept. The project is
    saved atomically, the previous file kept as ``project.qpproj.backup``, when anything
    changed and not ``dry_run``.
    """
    root = _local(search)
    if not root.is_dir():
        raise ConfigError("is not a folder (--search needs the folder to look for images in)",
                          root)
    plans: list[tuple[ProjectEntry, dict[str, Path], RelinkResult]] = []
    wanted: list[tuple[ProjectEntry, dict[str, Any], str, bool]] = []
    for e in project.entries:
        holders = list(_uri_holders(e.server_builder.raw))
        files = [h for h in holders if compat.is_file_uri(h["uri"])]
        result = RelinkResult(e.entry_id, e.image_name, "ok", e.uri, e.image_path)
        mapping: dict[str, Path] = {}
        if not files:
            result.status = "remote" if holders else "not found"
            result.note = None if holders else "the entry names no image file"
        for h in files:
            uri = h["uri"]
            pure = compat.file_uri_to_pure_path(uri)
            direct = compat.to_local_path(pure) if pure is not None else None
            if direct is not None and direct.is_absolute() and compat.path_exists(direct):
                continue
            moved = resolve_image_uri(uri, project.path, project.uri)
            if moved is not None:
                mapping[uri] = moved
                result.status, result.path = "moved", moved
            elif pure is not None and pure.name:
                wanted.append((e, h, pure.name, isinstance(pure, PureWindowsPath)))
            else:
                result.status, result.note = "not found", f"cannot read a file name in {uri!r}"
        plans.append((e, mapping, result))

    index = _Index(root, {name for _, _, name, _ in wanted}) if wanted else None
    by_entry = {id(e): (mapping, result) for e, mapping, result in plans}
    for e, holder, name, windows in wanted:
        mapping, result = by_entry[id(e)]
        assert index is not None
        status, chosen, candidates, note = _choose(
            name, index.find(name, windows), _recorded_size(holder), root)
        if chosen is not None:
            mapping[holder["uri"]] = chosen
            if result.status in ("ok", "moved"):
                result.status, result.path = "relinked", chosen
        elif not result.missing:
            result.status, result.path = status, None
        result.candidates, result.note = candidates, note

    changed = False
    for e, mapping, result in plans:
        if not mapping or result.missing:
            continue
        primary = e.uri
        builder = copy.deepcopy(e.server_builder.raw)
        for h in _uri_holders(builder):
            if h["uri"] in mapping:
                h["uri"] = compat.path_to_file_uri(mapping[h["uri"]])
        e.server_builder = ServerBuilder.from_json(builder)
        if primary in mapping:
            e.image_path = mapping[primary]
        e.relocated = False
        changed = True
    written = False
    if changed and not dry_run:
        project.save()
        written = True
    return RelinkReport(project.path, root, [r for _, _, r in plans], written)

"""The QuPath scripts: shipped inside the package, written by `qpseg groovy`, and their rules.

QuPath cannot run here, so the scripts' rules are checked on their text. Each rule rests on
QuPath's own source; ``QUPATH_CLAIMS`` lists those lines, the scripts must cite them, and when
``QUPATH_SOURCE`` names a git clone of github.com/qupath/qupath the lines are checked there.
Where a ``groovy`` command is installed, the scripts also run against stand-in QuPath classes.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qpseg.cli import main
from qpseg.cli.groovy import SCRIPTS, packaged_script, write_scripts

ROOT = Path(__file__).resolve().parents[1]
HOME = ROOT / "groovy"  # the scripts' home in the repository
EXPORT, IMPORT = SCRIPTS


def _text(name: str) -> str:
    return (HOME / name).read_text(encoding="utf-8")


def _code(name: str) -> str:
    """The script without comments (/* */ blocks and // to the end of a line)."""
    text = re.sub(r"/\*.*?\*/", "", _text(name), flags=re.S)
    return "\n".join(re.sub(r"\s*//.*$", "", line) for line in text.splitlines())


def _function(code: str, signature: str) -> str:
    """The body of the Groovy method whose declaration starts with ``signature``."""
    start = code.index(signature)
    depth, i = 0, code.index("{", start)
    for j in range(i, len(code)):
        depth += {"{": 1, "}": -1}.get(code[j], 0)
        if depth == 0:
            return code[i:j + 1]
    raise AssertionError(f"unbalanced braces after {signature}")


# --- shipped with the package --------------------------------------------------------------------


def test_scripts_home_is_the_top_level_folder() -> None:
    assert sorted(p.name for p in HOME.glob("*.groovy")) == sorted(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_groovy_folder_is_the_packaged_scripts(name: str) -> None:
    # One copy: groovy/ is a link to src/qpseg/groovy/, the folder the package carries, so the
    # scripts a repository user runs are the ones `qpseg groovy` writes.
    assert HOME.is_symlink() and HOME.resolve() == (ROOT / "src" / "qpseg" / "groovy").resolve()
    assert packaged_script(name) == (HOME / name).read_bytes()


@pytest.mark.slow
def test_built_wheel_carries_the_scripts(tmp_path: Path) -> None:
    # Build from a copy so the shared tree gets no build/ or egg-info churn; no network needed.
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("src", "groovy"):
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("qpseg-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        for name in SCRIPTS:
            assert zf.read(f"qpseg/groovy/{name}") == (HOME / name).read_bytes()


# --- qpseg groovy --out DIR ----------------------------------------------------------------------


def test_groovy_command_writes_the_scripts(tmp_path: Path, capsys) -> None:
    out = tmp_path / "scripts"
    assert main(["groovy", "--out", str(out)]) == 0
    for name in SCRIPTS:
        assert (out / name).read_bytes() == (HOME / name).read_bytes()
    printed = capsys.readouterr().out
    assert f"written: {out / IMPORT}" in printed
    # Again: nothing to do, nothing refused.
    assert main(["groovy", "--out", str(out)]) == 0
    assert f"unchanged: {out / EXPORT}" in capsys.readouterr().out
    assert not list(out.glob("*.bak"))


def test_groovy_command_refuses_to_replace_an_edited_script(tmp_path: Path, capsys) -> None:
    out = tmp_path / "scripts"
    out.mkdir()
    edited = out / IMPORT
    edited.write_text("// my REPLACE_PREVIOUS = false\n")
    assert main(["groovy", "--out", str(out)]) == 8
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {edited}: ") and "--overwrite" in err[0]
    assert edited.read_text() == "// my REPLACE_PREVIOUS = false\n"
    assert not (out / EXPORT).exists()  # nothing written when one file is refused
    assert main(["groovy", "--out", str(out), "--overwrite"]) == 0
    assert edited.read_bytes() == (HOME / IMPORT).read_bytes()
    assert (out / f"{IMPORT}.bak").read_text() == "// my REPLACE_PREVIOUS = false\n"


def test_write_scripts_reports_each_file(tmp_path: Path) -> None:
    assert write_scripts(tmp_path) == [(tmp_path / n, "written") for n in SCRIPTS]
    (tmp_path / EXPORT).write_text("old")
    assert write_scripts(tmp_path, overwrite=True) == [(tmp_path / EXPORT, "replaced"),
                                                        (tmp_path / IMPORT, "unchanged")]


def test_messages_that_send_users_to_a_script_say_how_to_get_it() -> None:
    # A pip-installed qpseg has no groovy/ folder: every error or warning naming a script must
    # also name the command that writes it.
    bad = []
    for path in sorted((ROOT / "src" / "qpseg").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if not (name.endswith("Error") or name == "warn"):
                continue
            text = " ".join(c.value for a in node.args for c in ast.walk(a)
                            if isinstance(c, ast.Constant) and isinstance(c.value, str))
            if ".groovy" in text and "qpseg groovy" not in text:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text[:80]}")
    assert bad == []


# --- the scripts' rules --------------------------------------------------------------------------

#: (tag, file, line, text on that line): the QuPath source lines the scripts rest on.
QUPATH_CLAIMS = [
    # 0.4's GeoJSON reader keeps metadata only on a MetadataStore, i.e. TMA cores.
    ("v0.4.4", "qupath-core/src/main/java/qupath/lib/io/QuPathTypeAdapters.java", 619,
     "pathObject instanceof MetadataStore"),
    ("v0.4.4", "qupath-core/src/main/java/qupath/lib/objects/TMACoreObject.java", 46,
     "implements MetadataStore"),
    # 0.5+: every object's metadata, filled from GeoJSON.
    ("v0.5.1", "qupath-core/src/main/java/qupath/lib/objects/PathObject.java", 1076,
     "public Map<String, String> getMetadata()"),
    ("v0.5.1", "qupath-core/src/main/java/qupath/lib/io/QuPathTypeAdapters.java", 625,
     "pathObject.getMetadata().put"),
    # getMetadata() allocates; hasMetadata() from 0.6; retrieveMetadataValue in 0.5.
    ("v0.5.1", "qupath-core/src/main/java/qupath/lib/objects/PathObject.java", 1078,
     "metadata = new MetadataMap()"),
    ("v0.5.1", "qupath-core/src/main/java/qupath/lib/objects/PathObject.java", 1040,
     "protected Object retrieveMetadataValue"),
    ("v0.6.0", "qupath-core/src/main/java/qupath/lib/objects/PathObject.java", 1102,
     "public boolean hasMetadata()"),
    ("v0.7.0", "qupath-core/src/main/java/qupath/lib/objects/PathObject.java", 1100,
     "public boolean hasMetadata()"),
    # GeoJSON id and isLocked are kept.
    ("v0.5.1", "qupath-core/src/main/java/qupath/lib/io/QuPathTypeAdapters.java", 601,
     "pathObject.setID(uuid)"),
    ("v0.5.1", "qupath-core/src/main/java/qupath/lib/io/QuPathTypeAdapters.java", 618,
     "pathObject.setLocked(isLocked)"),
    ("v0.7.0", "qupath-core/src/main/java/qupath/lib/objects/PathObject.java", 928,
     "public UUID getID()"),
    # importObjectsFromFile = readObjects + addObjects.
    ("v0.5.1", "qupath-core-processing/src/main/java/qupath/lib/scripting/QP.java", 2865,
     "PathIO.readObjects(new File(path))"),
    ("v0.7.0", "qupath-core-processing/src/main/java/qupath/lib/scripting/QP.java", 3119,
     "PathIO.readObjects(new File(path))"),
    # Headless -p: the image is read outside the try in 0.5/0.6, inside it in 0.7; the project
    # file is synced after -s only from 0.6.
    ("v0.5.1", "qupath-app/src/main/java/qupath/QuPath.java", 373,
     "imageData = entry.readImageData();"),
    ("v0.6.0", "qupath-app/src/main/java/qupath/QuPath.java", 386,
     "imageData = entry.readImageData();"),
    ("v0.7.0", "qupath-app/src/main/java/qupath/QuPath.java", 391,
     "try (var imageData = entry.readImageData())"),
    ("v0.6.0", "qupath-app/src/main/java/qupath/QuPath.java", 404, "project.syncChanges();"),
    # GUI "Run for project": ProjectTask saves image data, never the project file.
    ("v0.5.1", "qupath-gui-fx/src/main/java/qupath/lib/gui/scripting/DefaultScriptEditor.java",
     1673, "class ProjectTask"),
    ("v0.7.0", "qupath-gui-fx/src/main/java/qupath/lib/gui/scripting/DefaultScriptEditor.java",
     1699, "class ProjectTask"),
    # No image (headless without -p): no project entry.
    ("v0.5.1", "qupath-core-processing/src/main/java/qupath/lib/scripting/QP.java", 890,
     "if (project == null || imageData == null)"),
    ("v0.7.0", "qupath-core-processing/src/main/java/qupath/lib/scripting/QP.java", 955,
     "if (project == null || imageData == null)"),
    # Closing an image: lazily opened from 0.6, opened by readImageData() in 0.5.
    ("v0.6.0", "qupath-core/src/main/java/qupath/lib/images/ImageData.java", 584,
     "public void close() throws Exception"),
    ("v0.7.0", "qupath-core/src/main/java/qupath/lib/images/ImageData.java", 583,
     "public void close() throws Exception"),
    ("v0.5.1", "qupath-core/src/main/java/qupath/lib/projects/DefaultProject.java", 693,
     "server = getServerBuilder().build();"),
    # The export's GeoJSON writer with the FEATURE_COLLECTION option.
    ("v0.6.0", "qupath-core-processing/src/main/java/qupath/lib/scripting/QP.java", 3083,
     "public static void exportObjectsToGeoJson("),
    ("v0.7.0", "qupath-core-processing/src/main/java/qupath/lib/scripting/QP.java", 3087,
     "public static void exportObjectsToGeoJson("),
    # The import's originals: readObjects picks its reader by extension (a .bak gives nothing),
    # readObjectsFromGeoJSON reads any stream.
    ("v0.5.1", "qupath-core/src/main/java/qupath/lib/io/PathIO.java", 791,
     "if (name.endsWith(EXT_JSON) || name.endsWith(EXT_GEOJSON))"),
    ("v0.7.0", "qupath-core/src/main/java/qupath/lib/io/PathIO.java", 851,
     "if (name.endsWith(EXT_JSON) || name.endsWith(EXT_GEOJSON))"),
    ("v0.5.1", "qupath-core/src/main/java/qupath/lib/io/PathIO.java", 823,
     "public static List<PathObject> readObjectsFromGeoJSON(InputStream stream)"),
    ("v0.6.0", "qupath-core/src/main/java/qupath/lib/io/PathIO.java", 883,
     "public static List<PathObject> readObjectsFromGeoJSON(InputStream stream)"),
    ("v0.7.0", "qupath-core/src/main/java/qupath/lib/io/PathIO.java", 883,
     "public static List<PathObject> readObjectsFromGeoJSON(InputStream stream)"),
    # The "unchanged" test: class names as GeoJSON writes them, ROI geometry, cell nucleus, JTS.
    ("v0.5.1", "qupath-core/src/main/java/qupath/lib/io/GsonTools.java", 437,
     "PathClassTools.splitNames(value)"),
    ("v0.5.1", "qupath-core/src/main/java/qupath/lib/objects/PathROIObject.java", 142,
     "if (pathClass == PathClass.NULL_CLASS)"),
    ("v0.7.0", "qupath-core/src/main/java/qupath/lib/objects/PathROIObject.java", 141,
     "if (pathClass == PathClass.NULL_CLASS)"),
    ("v0.5.1", "qupath-core/src/main/java/qupath/lib/roi/interfaces/ROI.java", 173,
     "public Geometry getGeometry();"),
    ("v0.6.0", "qupath-core/src/main/java/qupath/lib/roi/interfaces/ROI.java", 175,
     "Geometry getGeometry();"),
    ("v0.7.0", "qupath-core/src/main/java/qupath/lib/roi/interfaces/ROI.java", 174,
     "Geometry getGeometry();"),
    ("v0.5.1", "qupath-core/src/main/java/qupath/lib/objects/PathCellObject.java", 79,
     "public ROI getNucleusROI()"),
    ("v0.7.0", "qupath-core/src/main/java/qupath/lib/objects/PathCellObject.java", 79,
     "public ROI getNucleusROI()"),
    # The review ranking as entry metadata: read, removed, put; the project list sorts a
    # metadata key's values with smartStringSort (numbers by value).
    ("v0.5.1", "qupath-core/src/main/java/qupath/lib/projects/ProjectImageEntry.java", 112,
     "public String removeMetadataValue(final String key);"),
    ("v0.5.1", "qupath-core/src/main/java/qupath/lib/projects/ProjectImageEntry.java", 122,
     "public String getMetadataValue(final String key);"),
    ("v0.5.1", "qupath-core/src/main/java/qupath/lib/projects/ProjectImageEntry.java", 134,
     "public String putMetadataValue(final String key, final String value);"),
    ("v0.6.0", "qupath-core/src/main/java/qupath/lib/projects/ProjectImageEntry.java", 109,
     "default String removeMetadataValue(final String key) {"),
    ("v0.6.0", "qupath-core/src/main/java/qupath/lib/projects/ProjectImageEntry.java", 123,
     "default String getMetadataValue(final String key) {"),
    ("v0.6.0", "qupath-core/src/main/java/qupath/lib/projects/ProjectImageEntry.java", 139,
     "default String putMetadataValue(final String key, final String value) {"),
    ("v0.7.0", "qupath-core/src/main/java/qupath/lib/projects/ProjectImageEntry.java", 109,
     "default String removeMetadataValue(final String key) {"),
    ("v0.7.0", "qupath-core/src/main/java/qupath/lib/projects/ProjectImageEntry.java", 123,
     "default String getMetadataValue(final String key) {"),
    ("v0.7.0", "qupath-core/src/main/java/qupath/lib/projects/ProjectImageEntry.java", 139,
     "default String putMetadataValue(final String key, final String value) {"),
    ("v0.5.1", "qupath-core/src/main/java/qupath/lib/projects/ProjectImageEntry.java", 62,
     "public String getID();"),
    ("v0.7.0", "qupath-core/src/main/java/qupath/lib/projects/ProjectImageEntry.java", 57,
     "String getID();"),
    ("v0.5.1", "qupath-core/src/main/java/qupath/lib/projects/Project.java", 215,
     "public List<ProjectImageEntry<T>> getImageList();"),
    ("v0.6.0", "qupath-core/src/main/java/qupath/lib/projects/Project.java", 216,
     "List<ProjectImageEntry<T>> getImageList();"),
    ("v0.7.0", "qupath-core/src/main/java/qupath/lib/projects/Project.java", 216,
     "List<ProjectImageEntry<T>> getImageList();"),
    ("v0.5.1", "qupath-gui-fx/src/main/java/qupath/lib/gui/panes/ProjectBrowser.java", 1320,
     "GeneralTools.smartStringSort(values);"),
    ("v0.6.0", "qupath-gui-fx/src/main/java/qupath/lib/gui/panes/ProjectBrowser.java", 1485,
     "GeneralTools.smartStringSort(values);"),
    ("v0.7.0", "qupath-gui-fx/src/main/java/qupath/lib/gui/panes/ProjectBrowser.java", 1483,
     "GeneralTools.smartStringSort(values);"),
    ("v0.5.1", "qupath-core/src/main/java/qupath/lib/common/GeneralTools.java", 922,
     "public static <T> void smartStringSort(Collection<T> collection, Function<T, String>"),
    ("v0.5.1", "gradle/libs.versions.toml", 42, 'jts             = "1.19.0"'),
    ("v0.6.0", "gradle/libs.versions.toml", 35, 'jts             = "1.20.0"'),
    ("v0.7.0", "gradle/libs.versions.toml", 36, 'jts             = "1.20.0"'),
]


def _citations(text: str) -> set[tuple[str, int, int, str]]:
    """(file, first line, last line, tag) of each "File.java:N[-M] at vX" (or a .toml file) in
    the comments; ":N at vX" right after such a citation is another line of the same file."""
    found = set()
    last_file = None
    comments = " ".join(re.findall(r"//(.*)", text))
    cite = r"([\w.]+\.(?:java|toml))?:(\d+)(?:-(\d+))?\s+at\s+(v\d+(?:\.\d+)*)"
    for m in re.finditer(cite, comments):
        last_file = m.group(1) or last_file
        first = int(m.group(2))
        if last_file:
            found.add((last_file, first, int(m.group(3) or first), m.group(4)))
    return found


def test_every_qupath_claim_is_cited_in_a_script() -> None:
    cited = _citations(_text(EXPORT)) | _citations(_text(IMPORT))
    missing = [(Path(f).name, line, tag) for tag, f, line, _ in QUPATH_CLAIMS
               if not any(c[0] == Path(f).name and c[1] <= line <= c[2] and c[3] == tag
                          for c in cited)]
    assert missing == []
    assert {c[3] for c in cited} <= {"v0.4.4", "v0.5.1", "v0.6.0", "v0.7.0"}


def test_citations_hold_in_qupath_source() -> None:
    src = os.environ.get("QUPATH_SOURCE")
    if not src or not Path(src).exists():
        pytest.skip("set QUPATH_SOURCE to a git clone of github.com/qupath/qupath")
    for tag, f, line, expected in QUPATH_CLAIMS:
        text = subprocess.run(["git", "-C", src, "show", f"{tag}:{f}"], capture_output=True,
                              text=True, check=True).stdout.splitlines()
        assert expected in text[line - 1], (tag, f, line, text[line - 1])


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_stop_on_qupath_04(name: str) -> None:
    code = _code(name)
    # The first statement after the imports refuses QuPath without PathObject.getMetadata().
    check = re.search(r"if \(!PathObject\.class\.getMethods\(\)\.any \{ it\.name == "
                      r"'getMetadata' && it\.parameterCount == 0 \}\) \{\s*throw new "
                      r"\w+\(\"qpseg: QuPath \$\{GeneralTools\.getVersion\(\)\} is not \"", code)
    assert check, "no QuPath 0.4 check"
    assert "need QuPath 0.5 or later" in code[check.end():check.end() + 200]
    header = _text(name).split("*/")[0]
    assert "Needs QuPath 0.5.x - 0.7.x" in header and "0.4 is refused" in header
    assert "0.4.x" not in header


def test_readme_says_what_the_scripts_support() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "QuPath 0.5–0.7" in readme and "0.4–0.7" not in readme
    assert "qpseg groovy --out" in readme
    # Every headless command in the README runs the scripts in project mode (per entry).
    for line in re.findall(r"QuPath script .*\.groovy", readme):
        assert "--args" in line and " -p " not in line, line


@pytest.mark.parametrize("name", SCRIPTS)
def test_metadata_is_read_without_allocating(name: str) -> None:
    code = _code(name)
    reader = _function(code, "Closure<String> markerReader()")
    # 0.6+: ask hasMetadata() before getMetadata(); 0.5: retrieveMetadataValue.
    assert "p.hasMetadata() ? p.getMetadata().get(MARKER) : null" in reader
    assert "p.retrieveMetadataValue(MARKER)" in reader
    assert reader.index("hasMetadata") < reader.index("retrieveMetadataValue")
    # Outside the reader, no object's metadata is touched directly.
    rest = code.replace(reader, "")
    assert re.findall(r"\.getMetadata\(|retrieveMetadataValue", rest) == []
    assert "qpsegValue.call(" in rest


def test_import_replaces_only_unreviewed_ai_objects() -> None:
    code = _code(IMPORT)
    body = _function(code, "String importEntry(")
    assert "qpsegValue.call(p) == null" in body  # only qpseg's objects are considered
    # The originals: the predictions file, then its newest numbered backup, read as GeoJSON
    # whatever the extension (readObjects would give nothing for a .bak).
    assert "def objects = PathIO.readObjects(predictions)" in body
    newest = _function(code, "File newestBackup(")
    assert r"\.bak(?:\.([1-9][0-9]*))?" in newest  # the slots _io.backups knows
    assert "PathIO.readObjectsFromGeoJSON(new FileInputStream(" in body
    assert body.index("objects.each") < body.index("readObjectsFromGeoJSON")  # current first
    # Each AI object: locked, no original, edited (kept, id remembered) or unreviewed (removed).
    assert re.search(r"if \(p\.isLocked\(\)\) \{\s*keptLocked << p", body)
    assert re.search(r"else if \(original == null\) \{\s*keptUnproven << p", body)
    assert re.search(r"else if \(edited\(p, original\)\) \{\s*keptEdited << p", body)
    for kept in ("Locked", "Unproven", "Edited"):
        assert re.search(f"kept{kept}" + r" << p\s*keptIds << p\.getID\(\)", body), kept
    assert re.search(r"else\s*previous << p", body)
    changed = _function(code, "boolean edited(")
    assert "p.getClass() != o.getClass()" in changed
    assert "className(p) != className(o)" in changed
    assert "p.getNucleusROI()" in changed and "o.getNucleusROI()" in changed
    moved = _function(code, "boolean moved(")
    assert "a.equalsExact(b, 0)" in moved
    assert "DiscreteHausdorffDistance.distance(outline(a), outline(b)) > TOLERANCE_PX" in moved
    assert "@Field double TOLERANCE_PX = 1.0" in code  # qpseg.review.DEFAULT_TOLERANCE_PX
    # ... and a prediction with a kept object's id is not added, after the removal.
    assert re.search(r"def added = objects\.findAll \{ !keptIds\.contains\(it\.getID\(\)\) \}\s*"
                     r"hierarchy\.addObjects\(added\)", body)
    assert "importObjectsFromFile" not in code  # it would add every object
    assert body.index("hierarchy.removeObjects(previous, true)") < body.index("addObjects")
    assert ('"removed ${previous.size()} unreviewed, kept ${keptEdited.size()} edited, "' in body
            and '"${keptLocked.size()} locked, ${keptUnproven.size()} without original, ${into}"'
            in body)


def test_import_tolerance_is_qpseg_review_default() -> None:
    from qpseg.review import DEFAULT_TOLERANCE_PX

    assert f"@Field double TOLERANCE_PX = {DEFAULT_TOLERANCE_PX!r}" in _code(IMPORT)


def test_import_saves_the_project_file_after_entry_metadata() -> None:
    body = _function(_code(IMPORT), "String importEntry(")
    put = body.index("entry.putMetadataValue(")
    save = body.index("entry.saveImageData(imageData)")
    sync = body.index("project.syncChanges()")
    assert put < save < sync


def test_import_sets_the_review_ranking_suggest_writes() -> None:
    from qpseg.suggest import _COLUMNS, MODEL_KEY, RANK_KEY, SCORE_KEY, SUGGESTIONS_FILE

    code = _code(IMPORT)
    assert f"@Field String SUGGESTIONS = '{SUGGESTIONS_FILE.name}'" in code
    assert SUGGESTIONS_FILE.parent.name == "qpseg"
    assert re.search(rf"RANKING_KEYS = \['{RANK_KEY}', '{SCORE_KEY}',\s*'{MODEL_KEY}'\]", code)
    read = _function(code, "Map<String, Map<String, String>> readSuggestions(")
    for column in [*re.findall(r"at\('(\w+)'\)", read), "rank", "entry_id", "score"]:
        assert column in _COLUMNS, column
    # Both modes set every entry's ranking before any image's import (an entry suggest ranked
    # may have no predictions yet), and the project file is saved when it changed.
    mode = code[code.index("if (scriptArgs && getProjectEntry() == null) {"):]
    assert mode.index("applySuggestions(project, baseDir)") < mode.index("for (entry in")
    image = code[code.rindex("def entry = getProjectEntry()"):]
    assert image.index("applySuggestions(getProject(), baseDir)") < image.index("importEntry(")
    apply = _function(code, "String applySuggestions(")
    assert re.search(r"if \(changed\)\s*project\.syncChanges\(\)", apply)
    assert "entry.removeMetadataValue(key)" in apply
    assert "entry.putMetadataValue(key, want)" in apply


@pytest.mark.parametrize(("name", "work"), [(EXPORT, "exportEntry(entry, imageData, baseDir)"),
                                            (IMPORT, "importEntry(project, entry, imageData, "
                                                     "baseDir)")])
def test_project_mode_handles_each_entry(name: str, work: str) -> None:
    code = _code(name)
    mode = code[code.index("if (scriptArgs && getProjectEntry() == null) {"):]
    loop = _function(mode, "for (entry in project.getImageList())")
    # Reading the image and the work are inside a per-entry try; a failure is recorded.
    attempt = _function(loop, "try")
    assert "entry.readImageData()" in attempt and work in attempt
    assert re.search(r"finally \{\s*closeImage\(imageData\)\s*\}", attempt)
    assert re.search(r"\}\s*catch \(Exception e\) \{\s*failed << ", loop)
    assert 'println "qpseg: FAILED ${failed[-1]}"' in loop
    # After the loop: fail the run (non-zero exit) naming every failed entry.
    after = mode[mode.index(loop) + len(loop):]
    assert re.match(r"\s*if \(failed\)\s*throw new RuntimeException\(", after)
    assert "ProjectIO.loadProject(" in mode


def test_export_writes_annotations_and_only_qpseg_detections() -> None:
    body = _function(_code(EXPORT), "String exportEntry(")
    assert "hierarchy.getDetectionObjects().findAll { qpsegValue.call(it) != null }" in body
    assert ("exportObjectsToGeoJson(annotations + aiDetections, tmp.toString(), "
            "'FEATURE_COLLECTION')") in body
    assert body.index("exportObjectsToGeoJson") < body.index("Files.move(tmp, target")


# --- the scripts run, on a stand-in for QuPath's classes -----------------------------------------
# QuPath itself cannot be installed here; where a `groovy` is on PATH, the scripts run against
# small Groovy classes with the QuPath methods they call, shaped like QuPath 0.4, 0.5 and 0.6+
# (which methods exist, what allocates), so their logic runs for real.

_STUB_PATH_OBJECT = """package qupath.lib.objects
class PathObject {
    static int allocations = 0
    UUID id = UUID.randomUUID()
    boolean locked = false
    boolean root = false
    String kind = 'annotation'
    Map<String, String> store = null
    qupath.lib.roi.interfaces.ROI roi = null
    qupath.lib.objects.classes.PathClass pathClass = null
    UUID getID() { id }
    boolean isLocked() { locked }
    boolean isRootObject() { root }
    boolean isCell() { false }
    qupath.lib.roi.interfaces.ROI getROI() { roi }
    qupath.lib.objects.classes.PathClass getPathClass() { pathClass }
    %(methods)s
}
"""
_METHODS = {
    "0.4": "",
    "0.5": """Map<String, String> getMetadata() { if (store == null) { store = [:]; allocations++ }
                                            store }
    protected Object retrieveMetadataValue(String key) { store == null ? null : store.get(key) }""",
    "0.6": """Map<String, String> getMetadata() { if (store == null) { store = [:]; allocations++ }
                                            store }
    boolean hasMetadata() { store != null && !store.isEmpty() }""",
}
_STUBS = {
    # One class per QuPath object type, as the GeoJSON reader makes them.
    "qupath/lib/objects/PathAnnotationObject.groovy": """package qupath.lib.objects
class PathAnnotationObject extends PathObject {}""",
    "qupath/lib/objects/PathDetectionObject.groovy": """package qupath.lib.objects
class PathDetectionObject extends PathObject {}""",
    "qupath/lib/objects/PathCellObject.groovy": """package qupath.lib.objects
class PathCellObject extends PathDetectionObject {
    qupath.lib.roi.interfaces.ROI nucleusROI = null
    boolean isCell() { true }
    qupath.lib.roi.interfaces.ROI getNucleusROI() { nucleusROI }
}""",
    "qupath/lib/objects/classes/PathClass.groovy": """package qupath.lib.objects.classes
class PathClass { String name; String toString() { name } }""",
    "qupath/lib/roi/interfaces/ROI.groovy": """package qupath.lib.roi.interfaces
class ROI {
    org.locationtech.jts.geom.Geometry geometry
    org.locationtech.jts.geom.Geometry getGeometry() { geometry }
}""",
    "qupath/lib/objects/PathObjects.groovy": """package qupath.lib.objects
class PathObjects {
    static PathObject createAnnotationObject(Object roi) { new PathObject() }
}""",
    "qupath/lib/objects/Hierarchy.groovy": """package qupath.lib.objects
class Hierarchy {
    PathObject rootObject = new PathObject(root: true, kind: 'root')
    List<PathObject> objects = []
    List<PathObject> getFlattenedObjectList(Object ignored) { [rootObject] + objects }
    void removeObjects(Collection<PathObject> gone, boolean keepChildren) {
        objects.removeAll(gone) }
    boolean addObjects(Collection<PathObject> more) { objects.addAll(more) }
    Collection<PathObject> getAnnotationObjects() { objects.findAll { it.kind == 'annotation' } }
    Collection<PathObject> getDetectionObjects() { objects.findAll {
        it.kind in ['detection', 'cell'] } }
}""",
    "qupath/lib/objects/Server.groovy": """package qupath.lib.objects
class Server { boolean closed = false; void close() { closed = true } }""",
    "qupath/lib/objects/ImageData.groovy": """package qupath.lib.objects
class ImageData %(closeable)s {
    Hierarchy hierarchy = new Hierarchy()
    Server server = new Server()
    Hierarchy getHierarchy() { hierarchy }
    Server getServer() { server }
    %(close)s
}""",
    "qupath/lib/objects/Entry.groovy": """package qupath.lib.objects
class Entry {
    String id
    String imageName
    ImageData data
    boolean unreadable = false
    Map<String, String> metadata = [:]
    int saves = 0
    String getID() { id }
    String getImageName() { imageName }
    ImageData readImageData() {
        if (unreadable) throw new IOException("cannot open " + imageName)
        data }
    String putMetadataValue(String k, String v) { metadata.put(k, v) }
    String getMetadataValue(String k) { metadata.get(k) }
    String removeMetadataValue(String k) { metadata.remove(k) }
    void saveImageData(ImageData d) { assert d.is(data); saves++ }
}""",
    "qupath/lib/objects/Project.groovy": """package qupath.lib.objects
class Project {
    java.nio.file.Path path
    List<Entry> imageList = []
    int syncs = 0
    java.nio.file.Path getPath() { path }
    List<Entry> getImageList() { imageList }
    void syncChanges() { syncs++ }
}""",
    "qupath/lib/projects/ProjectIO.groovy": """package qupath.lib.projects
class ProjectIO {
    static Map<String, Object> projects = [:]
    static Object loadProject(File file, Class cls) { projects[file.getCanonicalPath()] }
}""",
    "qupath/lib/io/PathIO.groovy": """package qupath.lib.io
import org.locationtech.jts.geom.*
import qupath.lib.objects.*
import qupath.lib.objects.classes.PathClass
import qupath.lib.roi.interfaces.ROI
class PathIO {
    static Map<String, Class> TYPES = [annotation: PathAnnotationObject,
                                       detection: PathDetectionObject, cell: PathCellObject]
    // As QuPath: the reader is chosen by extension, anything else gives no objects.
    static List<PathObject> readObjects(File file) {
        if (!(file.name.endsWith('.geojson') || file.name.endsWith('.json')))
            return []
        readObjectsFromGeoJSON(new FileInputStream(file))
    }
    static List<PathObject> readObjectsFromGeoJSON(InputStream stream) {
        def features = stream.withCloseable { new groovy.json.JsonSlurper().parse(it).features }
        features.collect { f ->
            def pr = f.properties
            def args = [id: UUID.fromString(f.id), kind: pr.objectType,
                        locked: pr.isLocked ?: false,
                        store: pr.metadata ? new HashMap(pr.metadata) : null,
                        roi: roi(f.geometry),
                        pathClass: pr.classification ? new PathClass(
                            name: pr.classification.name) : null]
            if (pr.objectType == 'cell')
                args.nucleusROI = roi(f.nucleusGeometry)
            TYPES[pr.objectType].newInstance(args)
        }
    }
    static ROI roi(Map g) {
        if (g == null)
            return null
        def gf = new GeometryFactory()
        def c = { List xy -> new Coordinate(xy[0] as double, xy[1] as double) }
        if (g.type == 'Point')
            return new ROI(geometry: gf.createPoint(c(g.coordinates)))
        assert g.type == 'Polygon'
        def rings = g.coordinates.collect { r -> gf.createLinearRing(r.collect(c) as Coordinate[]) }
        new ROI(geometry: gf.createPolygon(rings[0], rings.drop(1) as LinearRing[]))
    }
}""",
    "qupath/lib/common/GeneralTools.groovy": """package qupath.lib.common
class GeneralTools { static String getVersion() { '0.4.4' } }""",
    "qupath/lib/regions/ImagePlane.groovy": """package qupath.lib.regions
class ImagePlane { static Object getDefaultPlane() { null } }""",
    "qupath/lib/roi/ROIs.groovy": """package qupath.lib.roi
class ROIs { static Object createRectangleROI(a, b, c, d, e) { null } }""",
    "qupath/lib/scripting/QP.groovy": """package qupath.lib.scripting
class QP {
    static Object project
    static Object imageData
    static Object getProject() { project }
    static Object getCurrentImageData() { imageData }
    static Object getProjectEntry() {
        project == null || imageData == null ? null
            : project.imageList.find { it.data.is(imageData) } }
    // What the scripts of earlier qpseg versions called, so they run here too.
    static String PROJECT_BASE_DIR = '{%PROJECT}'
    static String buildFilePath(String... parts) {
        parts.collect { it == PROJECT_BASE_DIR ? project.path.parent.toString() : it }
             .join(File.separator) }
    static void mkdirs(String path) { new File(path).mkdirs() }
    static Object getCurrentHierarchy() { imageData.hierarchy }
    static Collection getAnnotationObjects() { imageData.hierarchy.annotationObjects }
    static Collection getDetectionObjects() { imageData.hierarchy.detectionObjects }
    static boolean importObjectsFromFile(String path) {
        imageData.hierarchy.addObjects(qupath.lib.io.PathIO.readObjects(new File(path))) }
    static void exportObjectsToGeoJson(Collection objs, String path, String option) {
        assert option == 'FEATURE_COLLECTION'
        new File(path).text = groovy.json.JsonOutput.toJson(objs.collect { it.getID().toString() })
    }
}""",
}
_DRIVER = r"""
import groovy.json.JsonOutput
import org.codehaus.groovy.control.CompilerConfiguration
import org.codehaus.groovy.control.customizers.ImportCustomizer
import qupath.lib.objects.*
import qupath.lib.projects.ProjectIO
import qupath.lib.scripting.QP

def (scriptFile, mode, base) = [new File(args[0]), args[1], new File(args[2])]
def project = new Project(path: new File(base, 'project.qpproj').toPath())
ProjectIO.projects[new File(base, 'project.qpproj').getCanonicalPath()] = project
def entries = (1..3).collect { new Entry(id: "$it", imageName: "slide$it", data: new ImageData()) }
project.imageList.addAll(entries)
entries[1].unreadable = mode == 'project'
// Entry metadata from before the import (an earlier ranking), as the test made it.
def preset = new File(base, 'entry_metadata.json')
if (preset.isFile())
    new groovy.json.JsonSlurper().parse(preset).each { id, m ->
        entries.find { it.id == id }.metadata.putAll(m) }
def h = entries[0].data.hierarchy
// The image's objects before the import (the user's and earlier qpseg ones), as the test made them.
h.objects.addAll(qupath.lib.io.PathIO.readObjectsFromGeoJSON(
        new FileInputStream(new File(base, 'image_objects.json'))))
h.objects.addAll((1..1000).collect { new PathObject(kind: 'detection') })
PathObject.allocations = 0

def config = new CompilerConfiguration()
config.addCompilationCustomizers(new ImportCustomizer().addStaticStars('qupath.lib.scripting.QP'))
def binding = new Binding()
if (mode == 'project') {
    binding.setVariable('args', [new File(base, 'project.qpproj').path] as String[])
} else {
    binding.setVariable('args', new String[0])
    QP.project = project
    QP.imageData = entries[0].data
}
def error = null
try {
    new GroovyShell(this.class.classLoader, binding, config).evaluate(scriptFile)
} catch (Exception e) {
    error = e.getClass().getSimpleName() + ': ' + e.getMessage()
}
println JsonOutput.toJson([
    error: error,
    ids: h.objects.findAll { it.store != null }.collect { it.getID().toString() },
    n_objects: h.objects.size(),
    allocations: PathObject.allocations,
    syncs: project.syncs,
    saves: entries.collect { it.saves },
    closed: entries.collect { it.data.server.closed },
    metadata: entries.collect { it.metadata },
])
"""


def _uid(name: str) -> str:
    """The id the fixture gives the object called ``name``."""
    import hashlib
    import uuid

    return str(uuid.UUID(bytes=hashlib.md5(name.encode()).digest(), version=3))


def _box(x: float, y: float, w: float, h: float) -> dict:
    return {"type": "Polygon",
            "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]]}


def _feature(name: str, box: tuple[float, float, float, float], kind: str = "detection",
             cls: str | None = "Tumor", locked: bool = False, marked: bool = True,
             nucleus: tuple[float, float, float, float] | None = None) -> dict:
    """One QuPath GeoJSON feature; ``marked``: written by qpseg (metadata qpseg_model)."""
    props: dict = {"objectType": kind, "isLocked": locked}
    if cls is not None:
        props["classification"] = {"name": cls, "color": [200, 0, 0]}
    if marked:
        props["metadata"] = {"qpseg_model": "m1"}
    f = {"type": "Feature", "id": _uid(name), "geometry": _box(*box), "properties": props}
    if nucleus is not None:
        f["nucleusGeometry"] = _box(*nucleus)
    return f


#: The image's objects before the import: the user's own annotation and earlier qpseg objects,
#: each named for what the review did to it.
_IMAGE = [
    _feature("user", (500, 500, 50, 50), kind="annotation", marked=False),
    _feature("old", (0, 0, 10, 10)),                                # untouched
    _feature("nudged", (20.5, 0, 10, 10), cls=" TUMOR "),           # within 1 px, same class
    _feature("reshaped", (40, 0, 15, 10)),                          # edge moved 5 px
    _feature("reclassified", (60, 0, 10, 10), cls="Stroma"),
    _feature("converted", (80, 0, 10, 10), kind="annotation"),      # detection -> annotation
    _feature("cell_same", (0, 20, 10, 10), kind="cell", nucleus=(2, 22, 4, 4)),
    _feature("cell_nucleus", (20, 20, 10, 10), kind="cell", nucleus=(5, 25, 4, 4)),
    _feature("locked", (40, 20, 10, 10), locked=True),
    _feature("unproven", (60, 20, 10, 10)),                         # another run's object
]
#: What qpseg wrote: the newest backup (``.bak.10``, numbered after ``.bak.9``) holds what the
#: image got; older backups hold other versions; the current file (the new predictions) has
#: new objects, the locked one, and ``reshaped``'s original, which comes before the backup's.
_ORIGINALS = [
    _feature("old", (0, 0, 10, 10)),
    _feature("nudged", (20, 0, 10, 10)),
    _feature("reshaped", (40, 0, 15, 10)),
    _feature("reclassified", (60, 0, 10, 10)),
    _feature("converted", (80, 0, 10, 10)),
    _feature("cell_same", (0, 20, 10, 10), kind="cell", nucleus=(2, 22, 4, 4)),
    _feature("cell_nucleus", (20, 20, 10, 10), kind="cell", nucleus=(2, 22, 4, 4)),
    _feature("locked", (40, 20, 10, 10)),
]
_STALE = [_feature("old", (0, 0, 30, 30)), _feature("nudged", (0, 0, 30, 30))]
_CURRENT = [_feature("new1", (0, 40, 10, 10)), _feature("locked", (40, 20, 10, 10)),
            _feature("reshaped", (40, 0, 10, 10)), _feature("new2", (20, 40, 10, 10))]


def _jts_jar() -> str | None:
    """A JTS jar (QuPath bundles JTS) for the import script's geometry test, or None."""
    named = os.environ.get("JTS_JAR")
    if named and Path(named).is_file():
        return named
    found = sorted(Path.home().glob(".m2/repository/org/locationtech/jts/jts-core/*/*.jar"))
    return str(found[-1]) if found else None


def _run_stubbed(tmp_path: Path, version: str, script: str, mode: str,
                 backups: bool = True, suggestions: str | None = None,
                 entry_metadata: dict | None = None) -> dict:
    import json
    import shutil

    groovy = shutil.which("groovy")
    if groovy is None:
        pytest.skip("no `groovy` on PATH to run the scripts against stand-in QuPath classes")
    jts = _jts_jar()
    if jts is None:
        pytest.skip("no JTS jar (set JTS_JAR, or have jts-core in ~/.m2) for the stand-ins")
    stubs = tmp_path / f"stubs{version}"
    closeable = version == "0.6"
    sources = dict(_STUBS)
    sources["qupath/lib/objects/PathObject.groovy"] = _STUB_PATH_OBJECT % {
        "methods": _METHODS[version]}
    sources["qupath/lib/objects/ImageData.groovy"] = sources[
        "qupath/lib/objects/ImageData.groovy"] % {
        "closeable": "implements AutoCloseable" if closeable else "",
        "close": "void close() { server.close() }" if closeable else ""}
    for rel, text in sources.items():
        (stubs / rel).parent.mkdir(parents=True, exist_ok=True)
        (stubs / rel).write_text(text)
    (tmp_path / "driver.groovy").write_text(_DRIVER)
    base = tmp_path / "project"

    def collection(features: list[dict]) -> str:
        return json.dumps({"type": "FeatureCollection", "features": features})

    preds = base / "qpseg" / "predictions"
    preds.mkdir(parents=True)
    (base / "image_objects.json").write_text(collection(_IMAGE))
    (preds / "1.geojson").write_text(collection(_CURRENT))
    if backups:
        (preds / "1.geojson.bak.10").write_text(collection(_ORIGINALS))
        for stale in ("1.geojson.bak", "1.geojson.bak.9"):
            (preds / stale).write_text(collection(_STALE))
    (preds / "1.metadata.json").write_text(json.dumps({"qpseg_objects": "4"}))
    (base / "project.qpproj").write_text("{}")
    if suggestions is not None:
        (base / "qpseg" / "suggestions.csv").write_text(suggestions, encoding="utf-8")
    if entry_metadata is not None:
        (base / "entry_metadata.json").write_text(json.dumps(entry_metadata))
    env = {**os.environ, "JAVA_HOME": os.environ.get("JAVA_HOME") or str(
        Path(os.path.realpath(shutil.which("java") or "/usr/bin/java")).parents[1])}
    out = subprocess.run([groovy, "-cp", os.pathsep.join([str(stubs), jts]),
                          str(tmp_path / "driver.groovy"), str(HOME / script), mode, str(base)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["stdout"] = out.stdout
    return result


#: After the import: the reviewed AI objects kept, the new predictions added.
_KEPT = ["reshaped", "reclassified", "converted", "cell_nucleus", "locked", "unproven"]
_REPORT = ("removed 3 unreviewed, kept 4 edited, 1 locked, 1 without original, "
           "imported 2 of 4 into 'slide1'")


@pytest.mark.slow
def test_import_runs_on_qupath_06_in_the_gui(tmp_path: Path) -> None:
    r = _run_stubbed(tmp_path, "0.6", IMPORT, "image")
    assert r["error"] is None, r["stdout"]
    # Untouched (old), moved < 1 px with the class in other case (nudged) and an unchanged cell
    # went; reshaped, reclassified, converted, a cell with a moved nucleus, the locked one and
    # one without an original stayed; new predictions with a kept object's id were not added.
    assert sorted(r["ids"]) == sorted(_uid(n) for n in [*_KEPT, "new1", "new2"])
    assert r["n_objects"] == 1 + 1000 + len(_KEPT) + 2  # the user's annotation, plain detections
    assert r["allocations"] == 0  # hasMetadata() first: no map for 1000 plain detections
    assert r["syncs"] == 1 and r["saves"] == [1, 0, 0]
    assert r["metadata"][0] == {"qpseg_objects": "4"}
    assert f"qpseg: {_REPORT}" in r["stdout"]


@pytest.mark.slow
def test_import_without_backups_keeps_what_it_cannot_compare(tmp_path: Path) -> None:
    r = _run_stubbed(tmp_path, "0.6", IMPORT, "image", backups=False)
    assert r["error"] is None, r["stdout"]
    # Only reshaped has an original (in the current file): nothing is provably unreviewed.
    marked = [f["id"] for f in _IMAGE if "metadata" in f["properties"]]
    assert sorted(r["ids"]) == sorted([*marked, _uid("new1"), _uid("new2")])
    assert ("removed 0 unreviewed, kept 1 edited, 1 locked, 7 without original, "
            "imported 2 of 4") in r["stdout"]


@pytest.mark.slow
def test_import_project_mode_on_qupath_05_carries_on_past_a_bad_entry(tmp_path: Path) -> None:
    r = _run_stubbed(tmp_path, "0.5", IMPORT, "project")
    assert r["error"].startswith("RuntimeException: qpseg: 1 of 3 entries failed: 'slide2'")
    assert "FAILED 'slide2' (entry 2): IOException: cannot open slide2" in r["stdout"]
    assert "no predictions for 'slide3'" in r["stdout"]  # the entry after it still ran
    assert sorted(r["ids"]) == sorted(_uid(n) for n in [*_KEPT, "new1", "new2"])
    assert f"qpseg: {_REPORT}" in r["stdout"]
    assert r["allocations"] == 0  # 0.5: the protected retrieveMetadataValue, no new maps
    assert r["saves"] == [1, 0, 0] and r["syncs"] == 1
    assert r["closed"] == [True, False, True]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_stop_on_qupath_04_when_run(tmp_path: Path, script: str) -> None:
    r = _run_stubbed(tmp_path, "0.4", script, "image")
    assert r["error"].startswith("UnsupportedOperationException: qpseg: QuPath 0.4.4 is not "
                                 "supported")
    assert r["n_objects"] == len(_IMAGE) + 1000 and r["saves"] == [0, 0, 0]


@pytest.mark.slow
def test_export_runs_on_qupath_06(tmp_path: Path) -> None:
    import json

    r = _run_stubbed(tmp_path, "0.6", EXPORT, "project")
    assert r["error"].startswith("RuntimeException: qpseg: 1 of 3 entries failed")
    exported = json.loads((tmp_path / "project" / "qpseg" / "annotations" / "1.geojson")
                          .read_text())
    # Every annotation and the qpseg detections (cells included), not the plain detections.
    assert sorted(exported) == sorted(f["id"] for f in _IMAGE)
    assert r["allocations"] == 0 and r["saves"] == [0, 0, 0]  # export changes nothing
    assert not list((tmp_path / "project" / "qpseg" / "annotations").glob("*.tmp"))


def _ranking() -> tuple[str, str]:
    """suggestions.csv as ``qpseg suggest`` writes it (its own writer): entries 3 and 2
    suggested, entry 1 ranked but not suggested; an image name that needs CSV quoting."""
    from qpseg.suggest import SlideScore, _csv_text

    sha = "ab12cd34ef56" + "0" * 52
    scores = [SlideScore(3, "slide3", 0.61234567, 0.5, 1e5, 2e5, rank=1),
              SlideScore(2, 'slide, "two"\nlines', 0.4, 0.25, 5e4, 2e5, rank=2),
              SlideScore(1, "slide1", 0.1, 0.0, 0.0, 2e5, rank=3)]
    return _csv_text(scores, 2, sha), sha


@pytest.mark.slow
@pytest.mark.parametrize(("version", "mode"), [("0.6", "image"), ("0.5", "project")])
def test_import_puts_the_review_ranking_into_the_entries(tmp_path: Path, version: str,
                                                         mode: str) -> None:
    from qpseg.suggest import MODEL_KEY, RANK_KEY, SCORE_KEY

    text, sha = _ranking()
    # Entry 1 was suggested by an earlier ranking; it is not any more.
    stale = {RANK_KEY: "1", SCORE_KEY: "0.9000", MODEL_KEY: "ffffffffffff", "lab": "kept"}
    r = _run_stubbed(tmp_path, version, IMPORT, mode, suggestions=text,
                     entry_metadata={"1": stale})
    assert r["error"] is None if mode == "image" else r["error"], r["stdout"]
    assert r["metadata"] == [
        {"qpseg_objects": "4", "lab": "kept"},
        {RANK_KEY: "2", SCORE_KEY: "0.4000", MODEL_KEY: sha[:12]},  # unreadable in project mode
        {RANK_KEY: "1", SCORE_KEY: "0.6123", MODEL_KEY: sha[:12]},  # no predictions
    ]
    # The ranking saved the project file once, the import of entry 1 once more.
    assert r["syncs"] == 2 and r["saves"] == [1, 0, 0]
    assert "review ranking from suggestions.csv: 2 entries suggested" in r["stdout"]


@pytest.mark.slow
def test_import_without_a_ranking_leaves_entry_metadata_alone(tmp_path: Path) -> None:
    from qpseg.suggest import RANK_KEY

    r = _run_stubbed(tmp_path, "0.6", IMPORT, "image", entry_metadata={"3": {RANK_KEY: "1"}})
    assert r["metadata"][2] == {RANK_KEY: "1"} and r["syncs"] == 1
    assert "review ranking" not in r["stdout"]

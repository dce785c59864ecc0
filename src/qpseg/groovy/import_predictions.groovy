/*
 * qpseg: import predictions written by `qpseg infer` into a QuPath project.
 *
 * Reads <project>/qpseg/predictions/<entryID>.geojson (QuPath GeoJSON). Objects written by qpseg
 * carry the object metadata key 'qpseg_model' (plus 'qpseg_run', 'qpseg_version').
 * With REPLACE_PREVIOUS = true, earlier qpseg objects in the image are replaced only where
 * nobody reviewed them - the rule of qpseg's Python side (qpseg.review): an object is removed
 * when it is unchanged from what qpseg wrote (its original: same id in <entryID>.geojson, else
 * in its newest backup <entryID>.geojson.bak[.N]) - same object type, same class (case and
 * surrounding spaces ignored), outline (and a cell's nucleus) within 1 px - and not locked.
 * Kept: locked objects (lock an AI object to accept it), edited ones (reshaped, reclassified,
 * converted), and ones without an original (they cannot be shown to be unchanged). A
 * prediction with the id of a kept object is not imported again. Objects without qpseg
 * metadata - the pathologist's own annotations - are never touched.
 * If <entryID>.metadata.json exists (a flat JSON object of strings, the per-slide summary),
 * its keys are stored as entry metadata (visible in the project's image list) and the project
 * file is saved.
 * If <project>/qpseg/suggestions.csv exists (the ranking `qpseg suggest` wrote: which slide to
 * review next), every entry it suggests gets the entry metadata qpseg_review_rank (1 = review
 * first), qpseg_review_score and qpseg_review_model, and every other entry loses them, so the
 * pathologist can sort the project list by qpseg_review_rank (Project tab > right click >
 * Sort by...). `qpseg suggest` also writes them into project.qpproj, but QuPath rewrites that
 * file from memory when it saves with the project open, so the script sets them itself.
 *
 * Needs QuPath 0.5.x - 0.7.x. QuPath 0.4 is refused: its GeoJSON reader keeps 'metadata' only
 * for TMA cores, so the 'qpseg_model' marker would be lost (every re-import would duplicate
 * all predictions and the export would lose the AI detections).
 * Get this file with `qpseg groovy --out DIR` (it ships inside the qpseg package).
 *
 * Run it:
 *   GUI:      open the project, Automate > Script editor > open this file > Run > Run for project
 *             (or Run, for the open image only)
 *   headless: QuPath script --args /path/to/project.qpproj import_predictions.groovy
 *             (no -p: the script opens the project itself, goes through every entry, reports
 *             each entry it cannot read and carries on, saves each image's data and the
 *             project file, and fails at the end when an entry failed)
 *   headless with -p works from QuPath 0.7 on (QuPath script -p project.qpproj -s ...): in
 *   0.5 and 0.6 one unreadable image aborts the whole -p run before this script sees it.
 *
 * Each rule below cites the QuPath source it rests on (github.com/qupath/qupath, at the tag).
 */
import groovy.transform.Field
import qupath.lib.common.GeneralTools
import qupath.lib.io.PathIO
import qupath.lib.objects.PathObject
import qupath.lib.objects.PathObjects
import qupath.lib.projects.ProjectIO
import qupath.lib.regions.ImagePlane
import qupath.lib.roi.ROIs
import org.locationtech.jts.algorithm.distance.DiscreteHausdorffDistance
import org.locationtech.jts.geom.Geometry
import org.locationtech.jts.geom.GeometryCollection
import org.locationtech.jts.geom.Polygonal

import java.awt.image.BufferedImage
import java.nio.file.Files

@Field boolean REPLACE_PREVIOUS = true
@Field String MARKER = 'qpseg_model'
// How far (level-0 px) an outline may move and still count as unchanged: qpseg.review's
// DEFAULT_TOLERANCE_PX (QuPath writes GeoJSON coordinates with 2 decimals).
@Field double TOLERANCE_PX = 1.0

// QuPath 0.4 keeps GeoJSON 'metadata' only on objects that implement MetadataStore
// (QuPathTypeAdapters.java:619-622 at v0.4.4), and only TMACoreObject does
// (TMACoreObject.java:46 at v0.4.4); PathObject.getMetadata() for every object arrived in 0.5
// (PathObject.java:1076 at v0.5.1; the reader fills it: QuPathTypeAdapters.java:625 at v0.5.1).
if (!PathObject.class.getMethods().any { it.name == 'getMetadata' && it.parameterCount == 0 }) {
    throw new UnsupportedOperationException("qpseg: QuPath ${GeneralTools.getVersion()} is not " +
            "supported: qpseg's scripts need QuPath 0.5 or later (QuPath 0.4 drops the object " +
            "metadata that marks qpseg's predictions, so re-imports would duplicate them)")
}

@Field Closure<String> qpsegValue = markerReader()

/** Reads the 'qpseg_model' metadata value of an object without allocating metadata maps. */
Closure<String> markerReader() {
    // 0.6+: hasMetadata() answers without creating a map (PathObject.java:1102 at v0.6.0,
    // :1100 at v0.7.0); getMetadata() creates one on every object that has none
    // (PathObject.java:1084-1091 at v0.6.0) - millions of detections.
    if (PathObject.class.getMethods().any { it.name == 'hasMetadata' && it.parameterCount == 0 })
        return { PathObject p -> p.hasMetadata() ? p.getMetadata().get(MARKER) : null }
    // 0.5 has no hasMetadata(); getMetadata() allocates (PathObject.java:1076-1079 at v0.5.1),
    // the protected retrieveMetadataValue does not (PathObject.java:1040-1041 at v0.5.1).
    // Groovy calls protected methods; if this runtime refuses, fall back to getMetadata().
    try {
        def probe = PathObjects.createAnnotationObject(
                ROIs.createRectangleROI(0, 0, 1, 1, ImagePlane.getDefaultPlane()))
        probe.retrieveMetadataValue(MARKER)
        return { PathObject p -> p.retrieveMetadataValue(MARKER) as String }
    } catch (Exception ignored) {
        return { PathObject p -> p.getMetadata().get(MARKER) }
    }
}

/** The newest backup qpseg kept of file (name.bak, name.bak.1, ...: highest number), or null. */
File newestBackup(File file) {
    // The slots qpseg._io.backups knows; links are passed over, as qpseg does.
    def pattern = ~(java.util.regex.Pattern.quote(file.getName()) + /\.bak(?:\.([1-9][0-9]*))?/)
    File newest = null
    long best = -1
    for (File f : (file.getParentFile().listFiles() ?: new File[0])) {
        def m = pattern.matcher(f.getName())
        if (!m.matches() || !f.isFile() || Files.isSymbolicLink(f.toPath()))
            continue
        long n = m.group(1) == null ? 0 : m.group(1) as long
        if (n > best) {
            best = n
            newest = f
        }
    }
    return newest
}

/** A class name as qpseg compares it: case and surrounding spaces ignored. */
String className(PathObject p) {
    // The GeoJSON 'classification' is the class's names joined as toString() does
    // (GsonTools.java:437 at v0.5.1); an unset class is null, never NULL_CLASS
    // (PathROIObject.java:142 at v0.5.1, :141 at v0.7.0).
    def pathClass = p.getPathClass()
    return pathClass == null ? '' : pathClass.toString().strip().toLowerCase(Locale.ROOT)
}

/** What is compared: a polygon's boundary, a point's or line's own geometry. */
Geometry outline(Geometry g) {
    if (g instanceof Polygonal)
        return g.getBoundary()
    if (g instanceof GeometryCollection && g.getClass() == GeometryCollection)
        // JTS refuses getBoundary() on a mixed collection: each part's outline instead.
        return g.getFactory().buildGeometry((0..<g.getNumGeometries()).collect {
            outline(g.getGeometryN(it)) })
    return g
}

/** True when two ROIs (either may be null) differ by more than TOLERANCE_PX anywhere. */
boolean moved(def roiA, def roiB) {
    if (roiA == null || roiB == null)
        return roiA != null || roiB != null
    // ROI.getGeometry(): ROI.java:173 at v0.5.1, :175 at v0.6.0, :174 at v0.7.0. QuPath bundles
    // JTS 1.19.0 (libs.versions.toml:42 at v0.5.1) and 1.20.0 (libs.versions.toml:35 at v0.6.0,
    // :36 at v0.7.0); both have DiscreteHausdorffDistance.distance(Geometry, Geometry), the
    // GEOS algorithm behind shapely.hausdorff_distance that qpseg.review uses.
    Geometry a = roiA.getGeometry()
    Geometry b = roiB.getGeometry()
    if (a.isEmpty() || b.isEmpty())
        return a.isEmpty() != b.isEmpty()
    if (a.getDimension() != b.getDimension())
        return true  // an area became a line or a point, as qpseg.review's geometry families
    if (a.equalsExact(b, 0))
        return false
    try {
        return DiscreteHausdorffDistance.distance(outline(a), outline(b)) > TOLERANCE_PX
    } catch (Exception ignored) {
        return true  // not provably unchanged
    }
}

/** True when p, an AI object in the image, is no longer what qpseg wrote (its original o). */
boolean edited(PathObject p, PathObject o) {
    // GeoJSON objectType -> one class per type (annotation, detection, cell, tile, TMA core).
    if (p.getClass() != o.getClass() || className(p) != className(o))
        return true
    if (moved(p.getROI(), o.getROI()))
        return true
    // A cell's nucleus too (PathCellObject.java:79 at v0.5.1, :79 at v0.7.0); exactly one with
    // a nucleus counts as moved.
    return p.isCell() && moved(p.getNucleusROI(), o.getNucleusROI())
}

// The ranking `qpseg suggest` writes (qpseg.suggest: SUGGESTIONS_FILE, RANK_KEY, SCORE_KEY,
// MODEL_KEY); the entry metadata keys are the ones it puts into project.qpproj.
@Field String SUGGESTIONS = 'suggestions.csv'
@Field List<String> RANKING_KEYS = ['qpseg_review_rank', 'qpseg_review_score',
                                    'qpseg_review_model']

/** The records of a CSV text as Python's csv module writes them (RFC 4180 quoting). */
List<List<String>> parseCsv(String text) {
    def rows = []
    def row = []
    def cell = new StringBuilder()
    boolean quoted = false
    int i = 0
    while (i < text.length()) {
        char ch = text.charAt(i)
        if (quoted) {
            if (ch == '"' as char) {
                if (i + 1 < text.length() && text.charAt(i + 1) == '"' as char) {
                    cell.append('"')
                    i++
                } else
                    quoted = false
            } else
                cell.append(ch)
        } else if (ch == '"' as char)
            quoted = true
        else if (ch == ',' as char) {
            row << cell.toString()
            cell = new StringBuilder()
        } else if (ch == '\n' as char || ch == '\r' as char) {
            boolean crlf = i + 1 < text.length() && text.charAt(i + 1) == '\n' as char
            if (ch == '\r' as char && crlf)
                i++
            row << cell.toString()
            cell = new StringBuilder()
            rows << row
            row = []
        } else
            cell.append(ch)
        i++
    }
    if (cell.length() > 0 || !row.isEmpty()) {
        row << cell.toString()
        rows << row
    }
    return rows
}

/**
 * The latest `qpseg suggest` ranking: entry ID -> the entry metadata of each suggested entry,
 * or null when the project has no suggestions.csv (the entries' metadata is then left alone).
 */
Map<String, Map<String, String>> readSuggestions(File baseDir) {
    def file = new File(new File(baseDir, 'qpseg'), SUGGESTIONS)
    if (!file.isFile())
        return null
    def rows = parseCsv(file.getText('UTF-8'))
    if (rows.isEmpty())
        return null
    def col = rows[0].withIndex().collectEntries { name, i -> [(name.strip()): i] }
    for (name in ['rank', 'entry_id', 'score', 'suggested'])
        if (!col.containsKey(name))
            throw new IllegalArgumentException("qpseg: ${file} is not a qpseg suggest ranking " +
                    "(no '${name}' column)")
    def ranking = new LinkedHashMap<String, Map<String, String>>()
    for (List<String> r : rows.drop(1)) {
        def at = { String name -> col.containsKey(name) && col[name] < r.size() ?
                r[col[name]].strip() : '' }
        if (at('suggested') != 'True' || !at('entry_id') || !at('rank'))
            continue
        def values = [(RANKING_KEYS[0]): at('rank'),
                      (RANKING_KEYS[1]): String.format(Locale.ROOT, '%.4f',
                              Double.parseDouble(at('score')))]
        if (at('model_sha256'))
            values[RANKING_KEYS[2]] = at('model_sha256').take(12)
        ranking[at('entry_id')] = values
    }
    return ranking
}

/**
 * Puts the suggest ranking (readSuggestions) into the entries' metadata and saves the project
 * file when anything changed; returns a one-line report, or null without a ranking.
 */
String applySuggestions(def project, File baseDir) {
    def ranking = readSuggestions(baseDir)
    if (ranking == null)
        return null
    // ProjectImageEntry's removeMetadataValue (ProjectImageEntry.java:112 at v0.5.1, :109 at
    // v0.6.0, :109 at v0.7.0), getMetadataValue (ProjectImageEntry.java:122 at v0.5.1, :123 at
    // v0.6.0, :123 at v0.7.0) and putMetadataValue (ProjectImageEntry.java:134 at v0.5.1, :139
    // at v0.6.0, :139 at v0.7.0); entries by getImageList() (Project.java:215 at v0.5.1, :216
    // at v0.6.0, :216 at v0.7.0), keyed by getID() (ProjectImageEntry.java:62 at v0.5.1, :57 at
    // v0.7.0), the entry ID suggest writes. The project list's "Sort by..." orders the values
    // with GeneralTools.smartStringSort (ProjectBrowser.java:1320 at v0.5.1, :1485 at v0.6.0,
    // :1483 at v0.7.0), numbers by value (GeneralTools.java:922 at v0.5.1): 10 follows 9.
    boolean changed = false
    int ranked = 0
    for (entry in project.getImageList()) {
        def values = ranking.get(entry.getID()) ?: [:]
        for (String key : RANKING_KEYS) {
            def want = values.get(key)
            if (want == entry.getMetadataValue(key))
                continue
            if (want == null)
                entry.removeMetadataValue(key)
            else
                entry.putMetadataValue(key, want)
            changed = true
        }
        if (values)
            ranked++
    }
    if (changed)
        project.syncChanges()  // see importEntry: entry metadata lives in project.qpproj
    return "review ranking from ${SUGGESTIONS}: ${ranked} entr${ranked == 1 ? 'y' : 'ies'} " +
            "suggested (sort the project list by ${RANKING_KEYS[0]})"
}

/** Imports one entry's predictions into imageData; returns a one-line report. */
String importEntry(def project, def entry, def imageData, File baseDir) {
    def predDir = new File(new File(baseDir, 'qpseg'), 'predictions')
    def predictions = new File(predDir, entry.getID() + '.geojson')
    if (!predictions.isFile())
        return "no predictions for '${entry.getImageName()}' (${predictions})"
    def hierarchy = imageData.getHierarchy()
    // What importObjectsFromFile does (QP.java:2865 at v0.5.1, :3119 at v0.7.0), minus kept ids.
    def objects = PathIO.readObjects(predictions)
    // The originals: what qpseg wrote, by id - the predictions file first, then its newest
    // backup (what the image got before the last `qpseg infer`). readObjects picks its reader
    // by extension and gives nothing for a .bak (PathIO.java:791 at v0.5.1, :851 at v0.7.0);
    // readObjectsFromGeoJSON reads any stream and closes it (PathIO.java:823 at v0.5.1,
    // :883 at v0.6.0, :883 at v0.7.0).
    def originals = new HashMap<UUID, PathObject>()
    if (REPLACE_PREVIOUS) {
        objects.each { originals.putIfAbsent(it.getID(), it) }
        def backup = newestBackup(predictions)
        if (backup != null) {
            try {
                PathIO.readObjectsFromGeoJSON(new FileInputStream(backup)).each {
                    originals.putIfAbsent(it.getID(), it) }
            } catch (Exception e) {
                // Unreadable: its objects have no original and stay.
                println "qpseg: cannot read ${backup}: ${e.getClass().getSimpleName()}: " +
                        "${e.getMessage()}"
            }
        }
    }
    // Kept qpseg objects' ids are remembered so the same prediction is not imported beside
    // them. GeoJSON 'id' becomes the object's id (QuPathTypeAdapters.java:600-601 at v0.5.1,
    // :591-592 at v0.7.0) and 'isLocked' is kept (QuPathTypeAdapters.java:617-618 at v0.5.1);
    // getID(): PathObject.java:928 at v0.7.0.
    def previous = []
    def keptLocked = []
    def keptUnproven = []
    def keptEdited = []
    def keptIds = new HashSet<UUID>()
    for (PathObject p : hierarchy.getFlattenedObjectList(null)) {
        if (p.isRootObject() || qpsegValue.call(p) == null)
            continue
        if (!REPLACE_PREVIOUS) {
            keptIds << p.getID()
            continue
        }
        def original = originals.get(p.getID())
        if (p.isLocked()) {
            keptLocked << p
            keptIds << p.getID()
        } else if (original == null) {
            keptUnproven << p
            keptIds << p.getID()
        } else if (edited(p, original)) {
            keptEdited << p
            keptIds << p.getID()
        } else
            previous << p
    }
    originals.clear()
    hierarchy.removeObjects(previous, true)
    def added = objects.findAll { !keptIds.contains(it.getID()) }
    hierarchy.addObjects(added)

    def summary = new File(predDir, entry.getID() + '.metadata.json')
    if (summary.isFile()) {
        def values = new groovy.json.JsonSlurper().parse(summary)
        values.each { k, v -> entry.putMetadataValue(k as String, v as String) }
    }
    entry.saveImageData(imageData)
    // Entry metadata lives in project.qpproj, which only syncChanges() writes. The GUI's
    // "Run for project" never calls it (ProjectTask, DefaultScriptEditor.java:1673-1765 at
    // v0.5.1, :1699-1791 at v0.7.0) and headless -s does only from 0.6 (QuPath.java:404 at
    // v0.6.0; absent at v0.5.1): without this the per-slide summary is lost.
    project.syncChanges()
    def into = "imported ${added.size()} of ${objects.size()} into '${entry.getImageName()}'"
    if (!REPLACE_PREVIOUS)
        return "kept ${keptIds.size()} earlier qpseg object(s) (REPLACE_PREVIOUS = false), ${into}"
    return "removed ${previous.size()} unreviewed, kept ${keptEdited.size()} edited, " +
            "${keptLocked.size()} locked, ${keptUnproven.size()} without original, ${into}"
}

/** Closes the image behind imageData without opening it just to close it. */
void closeImage(def imageData) {
    // 0.6+ opens the image lazily and ImageData.close() closes it only if it was opened
    // (ImageData.java:584-587 at v0.6.0, :583-586 at v0.7.0); 0.5 opens it in readImageData()
    // (DefaultProject.java:693 at v0.5.1), and ImageData has no close().
    if (imageData instanceof AutoCloseable)
        imageData.close()
    else
        imageData.getServer().close()
}

// getProjectEntry() is null without an image (QP.java:887-893 at v0.5.1, :952-958 at v0.7.0):
// run headless without -p, the project comes from --args.
def scriptArgs = binding.hasVariable('args') ? binding.getVariable('args') : null
if (scriptArgs && getProjectEntry() == null) {
    // Project mode: one entry at a time, each failure reported and the rest carried on with.
    // With -p, QuPath 0.5 and 0.6 read each image before the script, outside any try, so one
    // unreadable image ends the run (QuPath.java:373 at v0.5.1, :386 at v0.6.0); 0.7 catches it
    // per image (QuPath.java:391-403 at v0.7.0).
    def projectFile = new File(scriptArgs[0] as String)
    def project = ProjectIO.loadProject(projectFile, BufferedImage.class)
    def baseDir = project.getPath().getParent().toFile()
    def ranked = applySuggestions(project, baseDir)
    if (ranked != null)
        println "qpseg: ${ranked}"
    def failed = []
    for (entry in project.getImageList()) {
        try {
            def imageData = entry.readImageData()
            try {
                println "qpseg: ${importEntry(project, entry, imageData, baseDir)}"
            } finally {
                closeImage(imageData)
            }
        } catch (Exception e) {
            failed << "'${entry.getImageName()}' (entry ${entry.getID()}): " +
                    "${e.getClass().getSimpleName()}: ${e.getMessage()}"
            println "qpseg: FAILED ${failed[-1]}"
        }
    }
    if (failed)
        throw new RuntimeException("qpseg: ${failed.size()} of ${project.getImageList().size()} " +
                "entries failed: " + failed.join('; '))
    return
}

def entry = getProjectEntry()
if (entry == null) {
    println 'qpseg: no project entry - open a project image, or run headless with ' +
            '--args /path/to/project.qpproj'
    return
}
def baseDir = getProject().getPath().getParent().toFile()
// Every entry's ranking, also when this entry has no predictions (suggest ranks slides that
// were never imported); "Run for project" repeats it per image, which changes nothing.
def ranked = applySuggestions(getProject(), baseDir)
if (ranked != null)
    println "qpseg: ${ranked}"
println "qpseg: ${importEntry(getProject(), entry, getCurrentImageData(), baseDir)}"

/*
 * qpseg: import predictions written by `qpseg infer` into a QuPath project.
 *
 * Reads <project>/qpseg/predictions/<entryID>.geojson (QuPath GeoJSON). Objects written by qpseg
 * carry the object metadata key 'qpseg_model' (plus 'qpseg_run', 'qpseg_version').
 * With REPLACE_PREVIOUS = true, earlier qpseg objects in the image are removed first, except
 * locked ones: lock an AI object in QuPath to keep your reviewed/edited version; a prediction
 * with the same id as a locked object is then not imported again. Objects without qpseg
 * metadata - the pathologist's own annotations - are never touched.
 * If <entryID>.metadata.json exists (a flat JSON object of strings, the per-slide summary),
 * its keys are stored as entry metadata (visible in the project's image list) and the project
 * file is saved.
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

import java.awt.image.BufferedImage

@Field boolean REPLACE_PREVIOUS = true
@Field String MARKER = 'qpseg_model'

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

/** Imports one entry's predictions into imageData; returns a one-line report. */
String importEntry(def project, def entry, def imageData, File baseDir) {
    def predDir = new File(new File(baseDir, 'qpseg'), 'predictions')
    def predictions = new File(predDir, entry.getID() + '.geojson')
    if (!predictions.isFile())
        return "no predictions for '${entry.getImageName()}' (${predictions})"
    def hierarchy = imageData.getHierarchy()
    // Locked qpseg objects stay ("keep my version"); their ids are remembered so the same
    // prediction is not imported beside them. GeoJSON 'id' becomes the object's id
    // (QuPathTypeAdapters.java:600-601 at v0.5.1, :591-592 at v0.7.0) and 'isLocked' is kept
    // (QuPathTypeAdapters.java:617-618 at v0.5.1); getID(): PathObject.java:928 at v0.7.0.
    def previous = []
    def keptIds = new HashSet<UUID>()
    for (PathObject p : hierarchy.getFlattenedObjectList(null)) {
        if (p.isRootObject() || qpsegValue.call(p) == null)
            continue
        if (REPLACE_PREVIOUS && !p.isLocked())
            previous << p
        else
            keptIds << p.getID()
    }
    hierarchy.removeObjects(previous, true)
    // What importObjectsFromFile does (QP.java:2865 at v0.5.1, :3119 at v0.7.0), minus kept ids.
    def objects = PathIO.readObjects(predictions)
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
    return "removed ${previous.size()} earlier qpseg object(s), kept ${keptIds.size()} " +
            "locked, imported ${added.size()} of ${objects.size()} into '${entry.getImageName()}'"
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
println "qpseg: ${importEntry(getProject(), entry, getCurrentImageData(), baseDir)}"

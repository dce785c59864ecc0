/*
 * qpseg: export each image's annotations for `qpseg import-project`.
 *
 * Writes <project>/qpseg/annotations/<entryID>.geojson as a QuPath GeoJSON FeatureCollection
 * (objectType, classification {name, color}, measurements, metadata).
 * Exported: every annotation, plus the detections and cells that qpseg wrote (object metadata
 * key 'qpseg_model'), so that `qpseg evaluate-edits` sees which AI detections the pathologist
 * kept, reshaped or deleted. Other detections (e.g. QuPath's own cell detection) are left out:
 * there may be millions, and `qpseg import-project` takes labels from annotations.
 *
 * Needs QuPath 0.5.x - 0.7.x. QuPath 0.4 is refused: its GeoJSON reader keeps 'metadata' only
 * for TMA cores, so qpseg's detections could not be told apart from any others.
 * Get this file with `qpseg groovy --out DIR` (it ships inside the qpseg package).
 *
 * Run it:
 *   GUI:      open the project, Automate > Script editor > open this file > Run > Run for project
 *             (or Run, for the open image only)
 *   headless: QuPath script --args /path/to/project.qpproj export_annotations.groovy
 *             (no -p: the script opens the project itself, goes through every entry, reports
 *             each entry it cannot read and carries on, and fails at the end when one failed)
 *   headless with -p works from QuPath 0.7 on (QuPath script -p project.qpproj ...): in 0.5
 *   and 0.6 one unreadable image aborts the whole -p run before this script sees it.
 * Reads the project and changes nothing in it; each file is written atomically.
 *
 * Each rule below cites the QuPath source it rests on (github.com/qupath/qupath, at the tag).
 */
import groovy.transform.Field
import qupath.lib.common.GeneralTools
import qupath.lib.objects.PathObject
import qupath.lib.objects.PathObjects
import qupath.lib.projects.ProjectIO
import qupath.lib.regions.ImagePlane
import qupath.lib.roi.ROIs

import java.awt.image.BufferedImage
import java.nio.file.Files
import java.nio.file.StandardCopyOption

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

/** Exports one entry's annotations and qpseg detections; returns a one-line report. */
String exportEntry(def entry, def imageData, File baseDir) {
    def outDir = new File(new File(baseDir, 'qpseg'), 'annotations')
    outDir.mkdirs()
    def target = new File(outDir, entry.getID() + '.geojson').toPath()
    def tmp = new File(outDir, entry.getID() + '.geojson.tmp').toPath()
    def hierarchy = imageData.getHierarchy()
    def annotations = hierarchy.getAnnotationObjects()
    def aiDetections = hierarchy.getDetectionObjects().findAll { qpsegValue.call(it) != null }
    // FEATURE_COLLECTION export option: QP.java:3083 at v0.6.0, :3087 at v0.7.0.
    exportObjectsToGeoJson(annotations + aiDetections, tmp.toString(), 'FEATURE_COLLECTION')
    // Rename over the old file so qpseg never reads a half-written export.
    Files.move(tmp, target, StandardCopyOption.REPLACE_EXISTING, StandardCopyOption.ATOMIC_MOVE)
    return "${annotations.size()} annotation(s) and ${aiDetections.size()} qpseg " +
            "detection(s) of '${entry.getImageName()}' -> ${target}"
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
    def project = ProjectIO.loadProject(new File(scriptArgs[0] as String), BufferedImage.class)
    def baseDir = project.getPath().getParent().toFile()
    def failed = []
    for (entry in project.getImageList()) {
        try {
            def imageData = entry.readImageData()
            try {
                println "qpseg: ${exportEntry(entry, imageData, baseDir)}"
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
println "qpseg: ${exportEntry(entry, getCurrentImageData(), baseDir)}"

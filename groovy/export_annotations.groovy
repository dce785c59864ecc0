/*
 * qpseg: export the current image's annotations for `qpseg import-project`.
 *
 * Writes <project>/qpseg/annotations/<entryID>.geojson as a QuPath GeoJSON FeatureCollection
 * (the 0.4+ dialect: objectType, classification {name, color}, measurements, metadata).
 * Exported: every annotation, plus the detections and cells that qpseg wrote (metadata key
 * 'qpseg_model', QuPath 0.5+), so that `qpseg evaluate-edits` sees which AI detections the
 * pathologist kept, reshaped or deleted. Other detections (e.g. QuPath's own cell detection)
 * are left out: there may be millions, and `qpseg import-project` takes labels from annotations.
 *
 * Targets QuPath 0.4.x - 0.7.x (exportObjectsToGeoJson with "FEATURE_COLLECTION" appeared in 0.4).
 * Run for every image:
 *   GUI:      Automate > Script editor > open this file > Run > Run for project
 *   headless: QuPath script -p /path/to/project.qpproj groovy/export_annotations.groovy
 * Reads nothing and changes nothing in the project; the file is written atomically.
 */
import java.nio.file.Files
import java.nio.file.Paths
import java.nio.file.StandardCopyOption
import qupath.lib.objects.PathObject

String MARKER = 'qpseg_model'

// Object metadata: getMetadata() on every object since 0.5; annotations only in 0.4.
String metadataValue(PathObject p, String key) {
    if (p.metaClass.respondsTo(p, 'getMetadata'))
        return p.getMetadata()?.get(key)
    if (p.metaClass.respondsTo(p, 'retrieveMetadataValue'))
        return p.retrieveMetadataValue(key) as String
    return null
}

def entry = getProjectEntry()
if (entry == null) {
    println 'qpseg: no project entry - open a project (or pass -p project.qpproj)'
    return
}
def outDir = buildFilePath(PROJECT_BASE_DIR, 'qpseg', 'annotations')
mkdirs(outDir)
def target = Paths.get(buildFilePath(outDir, entry.getID() + '.geojson'))
def tmp = Paths.get(target.toString() + '.tmp')

def annotations = getAnnotationObjects()
def aiDetections = getDetectionObjects().findAll { metadataValue(it, MARKER) != null }
exportObjectsToGeoJson(annotations + aiDetections, tmp.toString(), 'FEATURE_COLLECTION')
// Rename over the old file so qpseg never reads a half-written export.
Files.move(tmp, target, StandardCopyOption.REPLACE_EXISTING, StandardCopyOption.ATOMIC_MOVE)
println "qpseg: ${annotations.size()} annotation(s) and ${aiDetections.size()} qpseg " +
        "detection(s) of '${entry.getImageName()}' -> ${target}"

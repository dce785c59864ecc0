/*
 * qpseg: import predictions written by `qpseg infer` into the current image.
 *
 * Reads <project>/qpseg/predictions/<entryID>.geojson (QuPath GeoJSON, 0.4+ dialect). Objects
 * written by qpseg carry the metadata key 'qpseg_model' (plus 'qpseg_run', 'qpseg_version').
 * With REPLACE_PREVIOUS = true, earlier qpseg objects in this image are removed first, except
 * locked ones (lock an AI object in QuPath to keep your reviewed/edited version). Objects without
 * qpseg metadata - the pathologist's own annotations - are never touched.
 * If <entryID>.metadata.json exists (a flat JSON object of strings, the per-slide summary),
 * its keys are stored as entry metadata (visible in the project's image list).
 *
 * Targets QuPath 0.4.x - 0.7.x (importObjectsFromFile and GeoJSON 'metadata' appeared in 0.4).
 * Run for every image:
 *   GUI:      Automate > Script editor > open this file > Run > Run for project
 *   headless: QuPath script -p /path/to/project.qpproj -s groovy/import_predictions.groovy
 *             (-s saves each image's data after the script)
 */
import qupath.lib.objects.PathObject

boolean REPLACE_PREVIOUS = true
String MARKER = 'qpseg_model'

def entry = getProjectEntry()
if (entry == null) {
    println 'qpseg: no project entry - open a project (or pass -p project.qpproj)'
    return
}
def predictions = new File(buildFilePath(PROJECT_BASE_DIR, 'qpseg', 'predictions', entry.getID() + '.geojson'))
if (!predictions.isFile()) {
    println "qpseg: no predictions for '${entry.getImageName()}' (${predictions})"
    return
}

// Object metadata: getMetadata() on every object since 0.5; annotations only in 0.4.
String metadataValue(PathObject p, String key) {
    if (p.metaClass.respondsTo(p, 'getMetadata'))
        return p.getMetadata()?.get(key)
    if (p.metaClass.respondsTo(p, 'retrieveMetadataValue'))
        return p.retrieveMetadataValue(key) as String
    return null
}

def hierarchy = getCurrentHierarchy()
if (REPLACE_PREVIOUS) {
    def previous = hierarchy.getFlattenedObjectList(null).findAll {
        !it.isRootObject() && !it.isLocked() && metadataValue(it, MARKER) != null
    }
    hierarchy.removeObjects(previous, true)
    println "qpseg: removed ${previous.size()} earlier qpseg object(s)"
}
def before = hierarchy.getFlattenedObjectList(null).size()
importObjectsFromFile(predictions.getAbsolutePath())
def added = hierarchy.getFlattenedObjectList(null).size() - before

def summary = new File(buildFilePath(PROJECT_BASE_DIR, 'qpseg', 'predictions', entry.getID() + '.metadata.json'))
if (summary.isFile()) {
    def values = new groovy.json.JsonSlurper().parse(summary)
    values.each { k, v -> entry.putMetadataValue(k as String, v as String) }
}
entry.saveImageData(getCurrentImageData())
println "qpseg: imported ${added} object(s) into '${entry.getImageName()}'"

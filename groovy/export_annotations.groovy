/*
 * qpseg: export the current image's annotations for `qpseg import-project`.
 *
 * Writes <project>/qpseg/annotations/<entryID>.geojson as a QuPath GeoJSON FeatureCollection
 * (the 0.4+ dialect: objectType, classification {name, color}, measurements, metadata).
 * Only annotations are exported; detections and cells are left out.
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
exportObjectsToGeoJson(annotations, tmp.toString(), 'FEATURE_COLLECTION')
// Rename over the old file so qpseg never reads a half-written export.
Files.move(tmp, target, StandardCopyOption.REPLACE_EXISTING, StandardCopyOption.ATOMIC_MOVE)
println "qpseg: ${annotations.size()} annotation(s) of '${entry.getImageName()}' -> ${target}"

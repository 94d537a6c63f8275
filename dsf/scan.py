"""The slides in a folder, as slide-sheet rows: what a user would otherwise write by hand.

A researcher points dsf at a folder of slides (DESIGN section 1). The folder is searched
recursively (GDC downloads put every slide in a folder of its own):

- every file with a slide format's suffix is a slide (`SLIDE_SUFFIXES`); a DICOM slide is a
  folder of `.dcm` instances of one series (Imaging Data Commons' layout), one slide per folder,
  and a folder of other DICOM objects (annotations, segmentations) is not a slide; the `.jpg`
  parts a Hamamatsu `.vms` names and MIRAX's data folders are parts of their slide, not slides;
- its id is the file name without the format suffix (`.ome.tiff` whole), with characters a
  slide id cannot hold replaced by `_` (a DICOM folder named only by a UID, as Imaging Data
  Commons names them, by the ContainerIdentifier, the slide's barcode); two slides with one id
  are an error naming both, or named by their paths when a sheet is written (`dsf sheet`);
- its annotation is found by name: `<id>.geojson`, `<id>.xml` (Aperio ImageScope saves
  `<id>.xml` beside the slide; other XML, e.g. a scanner's, is not taken) or
  `<id>.labels.tif|tiff|png` beside it (`<id>` also as the whole file name, `x.svs.geojson`),
  or in a separate labels folder also a file of the slide's own name (the BCSS layout:
  `images/` and `masks/` with the same names; CAMELYON16's `lesion_annotations/<id>.xml`);
- annotations as one binary mask per class (`labels.masks`, e.g. PAIP's `<id>_whole.tif`) are
  found by their pattern anywhere under the folder (or in the labels folder), and are not slides;
  a slide that has them uses them, not an annotation file beside it (PAIP's `<id>.xml`);
- slides named by a TCGA barcode are grouped by patient (`TCGA-TSS-PPPP`), DICOM slides by the
  PatientID they state, so one patient's slides never span folds; any other slide is a group of
  its own (write a sheet with a `group` column when patients are known otherwise).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import unicodedata
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from dsf.annotation_xml import is_annotation_xml
from dsf.errors import ConfigError, some

log = logging.getLogger(__name__)

#: Suffixes of the formats dsf reads (OpenSlide's, TIFF/OME-TIFF, DICOM, plain image regions).
OPENSLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi"}
)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
SLIDE_SUFFIXES = OPENSLIDE_SUFFIXES | IMAGE_SUFFIXES | {".dcm"}
#: Slide formats no reader here opens, named when a folder holds them (not passed over).
UNREAD_FORMATS = {
    ".vsi": "Olympus/Evident VSI",
    ".isyntax": "Philips iSyntax",
    ".kfb": "KFBio KFB",
    ".sdpc": "SQRAY SDPC",
}
#: What to convert a slide of one of `UNREAD_FORMATS` to.
CONVERT_TO = (
    "pyramidal OME-TIFF (Bio-Formats' bfconvert and QuPath write it; the vendor's own tools "
    "write tiled TIFF)"
)
#: Annotation files beside a slide: `<id><suffix>`.
SIDECARS = (".geojson", ".xml", ".labels.tif", ".labels.tiff", ".labels.png")
#: Per folder, its files' names by the stem before a sidecar suffix (`_sidecars`).
Beside = dict[Path, dict[str, list[str]]]
#: Annotations in a separate labels folder may also carry the slide's own file name.
LABEL_SUFFIXES = frozenset({".geojson", ".xml", ".tif", ".tiff", ".png"})

#: Suffixes to strip from a file name, longest first (`.ome.tiff` before `.tiff`).
_STRIP_ORDER = (".ome.tiff", ".ome.tif", *sorted(SLIDE_SUFFIXES, key=len, reverse=True))
_TCGA = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})(?![A-Z0-9])")
_BAD_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def _stem(name: str) -> str:
    """A file name without its format suffix (`.ome.tiff` whole)."""
    low = name.lower()
    for suffix in _STRIP_ORDER:
        if low.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _id_text(text: str) -> str:
    """`text` as id characters: accents off (`ä` -> `a`), other characters -> `_`; where a
    letter or digit has no ASCII form (`標本`, `ß`) a hash of `text` follows, so names that
    differ only there keep different ids."""
    chars, lost = [], False
    for c in text:
        plain = (
            unicodedata.normalize("NFKD", c).encode("ascii", "ignore").decode()
            if ord(c) > 127
            else c
        )
        lost |= not plain and unicodedata.category(c)[0] in "LN"
        chars.append(plain or "_")
    sid = _BAD_ID_CHARS.sub("_", "".join(chars)).strip("._-")
    if lost:
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        sid = f"{sid}_{digest}" if sid else f"slide_{digest}"
    return sid


def slide_id(name: str) -> str:
    """A slide id from a file or folder name: format suffix off, accents off, other characters
    -> `_` (and a hash of the name where letters have no ASCII form, `_id_text`)."""
    return _id_text(_stem(name)) or "slide"


#: SOP class of DICOM whole-slide images (VL Whole Slide Microscopy Image Storage).
VL_WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"


#: A folder named only by a series' UID or UUID, as Imaging Data Commons' downloads name them
#: (`SM_1.2.826...`, `SM_3f2a...-...`): no name for a slide.
_UID_FOLDER = re.compile(
    r"(?:[A-Z]{2,}_)?(?:\d+(?:\.\d+)+|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})",
    re.IGNORECASE,
)


class DicomSlide(NamedTuple):
    """What a folder of DICOM instances says of its slide."""

    path: Path  # the instance that stands in for the slide
    patient: str | None  # PatientID
    container: str | None  # ContainerIdentifier: the slide's own label (barcode)


def dicom_slide(folder: Path, instances: list[Path]) -> DicomSlide | None:
    """The instance that stands in for a folder of DICOM instances (its first pyramid level
    instance), the PatientID and ContainerIdentifier it states; None when the folder holds no
    whole-slide image (an annotation or segmentation series). Raises ConfigError when it holds
    several slides.

    Only headers are read (pydicom, up to the pixel data: about a millisecond each). A folder
    whose files pydicom cannot parse stands in by its first such file: opening the slide then
    reports it by name.
    """
    import pydicom

    series: dict[str, DicomSlide] = {}
    unreadable: list[Path] = []
    for f in instances:
        try:
            ds = pydicom.dcmread(
                f,
                stop_before_pixels=True,
                specific_tags=[
                    "SOPClassUID",
                    "PatientID",
                    "SeriesInstanceUID",
                    "ImageType",
                    "ContainerIdentifier",
                ],
            )
            sop = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
            image_type = [str(v) for v in (ds.get("ImageType", []) or [])]
            uid = str(ds.get("SeriesInstanceUID", ""))
            patient = str(ds.get("PatientID", "") or "").strip() or None
            container = str(ds.get("ContainerIdentifier", "") or "").strip() or None
        except Exception:  # noqa: BLE001 - pydicom raises many types on a damaged header
            unreadable.append(f)
            continue
        if sop != VL_WSI or len(image_type) < 3 or image_type[2] != "VOLUME":
            continue  # not a whole-slide image, or its label, overview or thumbnail
        series.setdefault(uid, DicomSlide(f, patient, container))
    if len(series) > 1:
        raise ConfigError(
            f"{folder} holds {len(series)} DICOM slides (series {', '.join(sorted(series))}): "
            "put each series in a folder of its own (Imaging Data Commons' default download "
            "layout does), or write the slide sheet by hand, a row per slide with one of its "
            ".dcm files as `path`"
        )
    if series:
        return next(iter(series.values()))
    if unreadable:
        return DicomSlide(unreadable[0], None, None)
    return None


def patient_group(sid: str) -> str | None:
    """The TCGA patient (`TCGA-A1-A0SK`) of a slide named by its barcode (in any case), else
    None."""
    m = _TCGA.match(sid.upper())
    return m.group(1) if m else None


def _vms_parts(vms: Path) -> set[Path]:
    """The image files a Hamamatsu .vms index names (its tiles, map and macro)."""
    parts: set[Path] = set()
    try:
        text = vms.read_text(encoding="latin-1")
    except OSError:
        return parts
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and value.strip() and key.strip().lower().startswith(("imagefile", "mapfile")):
            parts.add((vms.parent / value.strip()).resolve())
    return parts


def _is_results(folder: Path) -> bool:
    """Whether `folder` is a dsf results folder (a run started inside the slide folder, or one
    kept beside the slides): its folds table, or its tissue masks beside its logs."""
    return (folder / "folds.tsv").is_file() or (
        (folder / "tissue").is_dir() and (folder / "logs").is_dir()
    )


#: Name endings of a label mask saved beside its slide under another convention than
#: `<name>.labels.tif` (`a_mask.tif`, `a-labels.tiff`, `a_gt.png`): taken for slides otherwise.
_MASK_LIKE = re.compile(r"^(.+?)[_\-. ](mask|masks|label|labels|annotation|annotations|gt)$", re.I)


#: `<another slide's name>_<word>`: a per-class mask whose name fits no `labels.masks` pattern.
_CLASS_MASK_LIKE = re.compile(r"^(.+)[_\-. ]([^_\-. ]+)$")


def _warn_mask_like(slides: list[Path], masks: dict[str, str] | None = None) -> None:
    """Warn of slide files named like a label mask of another slide beside them: they are
    taken for slides (and fail as slides without tissue) unless named `<name>.labels.tif`.
    With per-class masks (`labels.masks`), also of files named `<slide>_<word>` anywhere
    among the slides (`case02_viabel.tif`, a typo of `case02_viable.tif`)."""
    stems = {(f.parent, _stem(f.name)) for f in slides}
    anywhere = {_stem(f.name) for f in slides}
    for f in slides:
        c = _CLASS_MASK_LIKE.match(_stem(f.name)) if masks else None
        if c and c.group(1) in anywhere:
            log.warning(
                "%s is named like a per-class mask of slide %r but fits no labels.masks "
                "pattern (%s), so it is taken for a slide: rename it, or move it away",
                f,
                c.group(1),
                ", ".join(pattern.replace("{slide}", c.group(1)) for pattern in masks.values()),
            )
            continue
        m = _MASK_LIKE.match(_stem(f.name))
        if m and (f.parent, m.group(1)) in stems:
            log.warning(
                "%s is named like a label mask of slide %r beside it, and is taken for a slide: "
                "name it %s.labels%s to make it that slide's annotation (or give per-class "
                "masks with labels.masks), or move it away",
                f,
                m.group(1),
                m.group(1),
                f.suffix.lower(),
            )


def _warn_missing_masks(
    rows: list[dict[str, Any]], masks: dict[str, str], names: dict[str, str]
) -> None:
    """Warn of slides that have some of the per-class masks of `labels.masks` but not all (a
    PAIP slide without its `_viable.tif` would train its viable tumour as whole tumour),
    naming each missing file as the pattern expects it."""
    gaps = []
    for row in rows:
        if not row["masks"]:
            continue
        name = names.get(row["slide"], row["slide"])
        lacking = [cls for cls in masks if cls not in row["masks"]]
        gaps += [f"{row['slide']} {cls} ({masks[cls].replace('{slide}', name)})" for cls in lacking]
    if gaps:
        log.warning(
            "slides with per-class masks lack some classes' masks, so those classes go "
            "unlabelled or as another class there: %s. Give each slide every mask of "
            "labels.masks (an empty one where a class is absent), or check the file names",
            some(gaps, 5),
        )


def _is_qupath_data(folder: Path) -> bool:
    """The `data` folder of a QuPath project (beside its `project.qpproj`), which holds each
    image's thumbnail and objects: pictures, not slides. The project's other files are searched:
    slides may be kept in its folder."""
    try:
        return folder.name == "data" and any(folder.parent.glob("*.qpproj"))
    except OSError:
        return False


def _unread_note(files: list[Path]) -> str:
    """`3 slides in formats dsf does not read (Olympus/Evident VSI: a.vsi, ...)`."""
    kinds = Counter(UNREAD_FORMATS[f.suffix.lower()] for f in files)
    return (
        f"{len(files)} slide{'s' * (len(files) != 1)} in formats dsf does not read "
        f"({', '.join(sorted(kinds))}: {some([f.name for f in files])})"
    )


def _walk(
    folder: Path,
    skip: set[Path],
    seen: set[Path] | None = None,
    names: dict[Path, list[Path]] | None = None,
) -> Iterable[Path]:
    """Files under `folder`, sorted, without hidden ones, Zarr stores or the `skip` folders;
    a folder or a file reached twice (a symlink) is taken once, where it is met first (one
    slide under two names would get two ids and could sit in two folds). `names` collects
    every name of each file met (its real path -> names in walk order), for `_one_name`."""
    seen = set() if seen is None else seen
    names = {} if names is None else names
    seen.add(folder.resolve())
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        real = entry.resolve()  # once per entry: a cohort's folder holds tens of thousands
        if real in skip:
            continue
        if entry.is_dir():
            if entry.suffix.lower() == ".zarr" or real in seen:
                continue
            if (entry.parent / f"{entry.name}.mrxs").is_file():
                continue  # a MIRAX slide's data folder
            if _is_results(entry):
                log.warning("%s: a dsf results folder (maps are no slides), not searched", entry)
                continue
            if _is_qupath_data(entry):
                log.info("%s: a QuPath project's data (thumbnails, no slides), not searched", entry)
                continue
            yield from _walk(entry, skip, seen, names)
        elif entry.is_symlink() and not entry.exists():
            log.warning(
                "%s: a link to %s, which is not there: not a slide (restore its target or "
                "remove the link)",
                entry,
                os.readlink(entry),
            )
        elif entry.is_file():
            names.setdefault(real, []).append(entry)
            if real in seen:
                continue
            seen.add(real)
            yield entry


def _one_name(entry: Path, names: list[Path], index: dict[str, list[Path]], beside: Beside) -> Path:
    """The name a slide file reached under several names (links) is taken by: the one its
    annotation is found beside (a link elsewhere must not take an annotated slide's place and
    leave its annotation behind), else the first met. Two names with annotations of their own
    are an error: which is the slide's cannot be told."""
    annotated = [n for n in names if _find_labels(n, slide_id(n.name), index, beside)]
    if len(annotated) > 1:
        raise ConfigError(
            f"{' and '.join(map(str, annotated))} are one file (links) with an annotation "
            "beside each; remove one of the links or one of the annotations"
        )
    chosen = annotated[0] if annotated else entry
    log.warning(
        "%s: one file reached under %d names (links: %s); taken once, as slide %r%s",
        chosen,
        len(names),
        ", ".join(str(n) for n in names if n != chosen),
        slide_id(chosen.name),
        " (the name its annotation is found by)" if annotated else " (the first met)",
    )
    return chosen


def _name_pattern(pattern: str, key: str) -> re.Pattern[str]:
    """A file-name regex capturing the slide id from a name pattern with `{slide}` once."""
    name = Path(pattern).name
    if name.count("{slide}") != 1:
        raise ConfigError(
            f"{key}: {pattern!r} must name the file with {{slide}} once, e.g. '{{slide}}_mask.tiff'"
        )
    head, tail = name.split("{slide}")
    return re.compile(f"^{re.escape(head)}(.+){re.escape(tail)}$", re.IGNORECASE)


def _label_index(labels_dir: Path | None, name: str | None = None) -> dict[str, list[Path]]:
    """The annotation files of a labels folder by the name they match (`x.png`, `x.labels.tif`
    and `x.geojson` all match slide `x`; with a `name` pattern, `{slide}_mask.tiff`, only the
    files it fits, by the part that stands for `{slide}`)."""
    rx = _name_pattern(name, "--labels-name") if name is not None else None
    index: dict[str, list[Path]] = {}
    for p in sorted(labels_dir.iterdir()) if labels_dir is not None else ():
        if not p.is_file() or p.name.startswith(".") or p.suffix.lower() not in LABEL_SUFFIXES:
            continue
        if rx is not None:
            if m := rx.match(p.name):
                index.setdefault(m.group(1), []).append(p)
            continue
        stem = p.name[: -len(p.suffix)]
        stem = stem[: -len(".labels")] if stem.lower().endswith(".labels") else stem
        index.setdefault(stem, []).append(p)
    return index


def _sidecars(slide: Path, stems: set[str], beside: Beside) -> list[Path]:
    """Files beside `slide` named `<stem><sidecar suffix>` for one of `stems`, the suffix in
    any case (`x.GeoJSON`, `x.LABELS.TIF`: slide suffixes are matched so too), the stem as is.
    `beside` caches each folder's files by stem: one listing per folder, and a lookup per slide
    (matching every file against every slide had taken minutes in a folder of 30,000 slides,
    at every start of the workflow and of each cluster job)."""
    folder = slide.parent
    if folder not in beside:
        by_stem: dict[str, list[str]] = {}
        try:
            names = [p.name for p in folder.iterdir() if p.is_file()]
        except OSError:
            names = []
        for name in names:
            low = name.lower()
            for suffix in SIDECARS:
                if low.endswith(suffix) and len(name) > len(suffix):
                    by_stem.setdefault(name[: -len(suffix)], []).append(name)
        beside[folder] = by_stem
    return [folder / name for stem in stems for name in beside[folder].get(stem, [])]


def _find_labels(
    slide: Path,
    sid: str,
    index: dict[str, list[Path]],
    beside: Beside,
    shared_stem: bool = False,
) -> str | None:
    """The one annotation file of a slide (a file, or a DICOM folder), found by its id or its
    file name without the format suffix, beside it (`beside`: see `_sidecars`) or in the
    labels folder's `index`; two candidates are an error. With `shared_stem` (another slide
    beside it has its name without the suffix: `s1.svs`, `s1.tiff`), only its whole file name
    (`s1.svs.geojson`) or its id names its annotation: `s1.geojson` would be both slides'."""
    stem = _stem(slide.name)
    # QuPath may name exports `x.svs.geojson`; a script's Path.with_suffix `x.ome.geojson`
    stems = {sid, stem, slide.name, slide.name.rsplit(".", 1)[0]}
    if shared_stem:
        stems -= {stem}
        bare = [
            p
            for p in _sidecars(slide, {stem}, beside)
            if p.suffix.lower() != ".xml" or _annotation_xml(p)
        ]
        if bare:
            raise ConfigError(
                f"{bare[0]} lies beside slides that share its name ({slide.name} is one), so "
                f"it cannot be told to one of them; name it after its slide's whole file name "
                f"({slide.name}{bare[0].name[len(stem) :]})"
            )
    found = _sidecars(slide, stems, beside)
    found += [p for stem in stems for p in index.get(stem, [])]
    found = sorted(p for p in set(found) if p.suffix.lower() != ".xml" or _annotation_xml(p))
    if len(found) > 1:
        raise ConfigError(
            f"slide {sid!r} ({slide}) has {len(found)} annotation files: "
            f"{', '.join(str(p) for p in found)}; keep one, or write the sheet by hand"
        )
    return str(found[0]) if found else None


def _warn_unmatched(walked: list[Path], index: dict[str, list[Path]], matched: set[Path]) -> None:
    """Warn of annotation files no slide takes (`s9.geojson` for slide `s4`, a typo: the
    slide had silently gone unannotated): named like annotations beside the slides, or in
    the labels folder."""
    beside = [
        f
        for f in walked
        if f.name.lower().endswith(SIDECARS) and (f.suffix.lower() != ".xml" or _annotation_xml(f))
    ]
    theirs = sorted({f for f in [*beside, *(p for ps in index.values() for p in ps)]} - matched)
    if theirs:
        log.warning(
            "%d annotation file(s) are named after no slide, so no slide is annotated by them: "
            "%s. Name each after its slide (`<slide>.geojson`, `<slide file name>.geojson`), "
            "or move it away",
            len(theirs),
            some([str(f) for f in theirs], 5),
        )


def _annotation_xml(path: Path) -> bool:
    """Whether an XML file named like a slide is its annotation (not a scanner's own XML)."""
    try:
        return is_annotation_xml(path)
    except (OSError, ET.ParseError) as exc:
        raise ConfigError(
            f"{path} is named like an annotation but is not readable XML ({exc}); fix it or "
            "move it out of the slide folder"
        ) from exc


def _mask_patterns(masks: dict[str, str]) -> list[tuple[str, re.Pattern[str]]]:
    """(class, file-name regex capturing the slide id) of each `labels.masks` pattern."""
    return [(cls, _name_pattern(p, f"config key labels.masks.{cls}")) for cls, p in masks.items()]


def _split_masks(
    files: list[Path], masks: dict[str, str]
) -> tuple[list[Path], dict[str, dict[str, Path]]]:
    """The files that are not per-class masks, and the masks by slide id and class: a file
    whose name fits a `labels.masks` pattern around the id of another file found (PAIP's
    `01_01_0083_whole.tif` beside `01_01_0083.svs`, or in a folder of its own)."""
    patterns = _mask_patterns(masks)
    ids = {slide_id(f.parent.name if f.suffix.lower() == ".dcm" else f.name) for f in files}
    found: dict[str, dict[str, Path]] = {}
    rest = []
    for f in files:
        hits = [(cls, m.group(1)) for cls, rx in patterns if (m := rx.match(f.name))]
        hits = [(cls, slide_id(sid)) for cls, sid in hits if slide_id(sid) in ids]
        if not hits:
            rest.append(f)
            continue
        cls, sid = hits[0]
        if cls in found.setdefault(sid, {}):
            raise ConfigError(
                f"slide {sid!r} has two {cls} masks: {found[sid][cls]} and {f}; keep one, or "
                "write the sheet by hand"
            )
        found[sid][cls] = f
    return rest, found


def _slide_ids(
    folder: Path,
    entries: list[Path],
    names: dict[Path, str],
    unique: bool,
    keep: set[str] = frozenset(),  # type: ignore[assignment]
) -> dict[Path, str]:
    """Each slide's id: its name; where two share one and `unique`, their path under `folder`
    (`site1_s`), with the format suffix kept when that is all they differ by, unless the name
    is one of `keep` (an earlier run's id: only the user knows which file that slide is)."""
    by_name: dict[str, list[Path]] = {}
    for entry in entries:
        by_name.setdefault(names[entry], []).append(entry)
    ids: dict[Path, str] = {}
    for name, same in by_name.items():
        if len(same) == 1:
            ids[same[0]] = name
            continue
        if not unique:
            raise ConfigError(
                f"two slides under {folder} get the id {name!r}: {same[0]} and {same[1]}; "
                f"rename one, or write a slide sheet, `dsf sheet {folder} --out slides.tsv` "
                "(it names such slides by their folders), and set `slides` to it"
            )
        if name in keep:
            raise ConfigError(
                f"{len(same)} slides under {folder} are named {name!r} "
                f"({', '.join(map(str, same))}), and the earlier run has a slide {name!r}: "
                "naming them by their paths would give "
                "it a new id (its artifacts rebuilt, its fold lost). Rename the file(s) added "
                "since, or write the sheet by hand with the earlier slide under its id"
            )
        rel = [e.relative_to(folder).as_posix() for e in same]
        named = [slide_id(r) for r in rel]
        if len(set(named)) < len(named):
            named = [_id_text(r) for r in rel]
        for entry, sid in zip(same, named, strict=True):
            ids[entry] = sid
        log.warning(
            "%d slides are named %r; their ids are their paths: %s",
            len(same),
            name,
            ", ".join(named),
        )
    taken: dict[str, Path] = {}
    for entry, sid in ids.items():
        if sid in taken:
            raise ConfigError(
                f"two slides under {folder} get the id {sid!r}: {taken[sid]} and {entry}; "
                "rename one, or write the slide sheet by hand"
            )
        taken[sid] = entry
    return ids


def scan_folder(
    folder: str | Path,
    labels_dir: str | Path | None = None,
    mpp: float | None = None,
    exclude: Iterable[str | Path] = (),
    masks: dict[str, str] | None = None,
    labels_name: str | None = None,
    unique_ids: bool = False,
    keep_ids: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Slide-sheet rows (slide, path, mpp, labels, group, fold, masks) of every slide under
    `folder`.

    Paths are absolute. `mpp` fills every row's `mpp` (for images that state none); `exclude`
    names folders not to search (the workflow's results); `masks` (class -> file name with
    `{slide}`, `labels.masks`) finds per-class masks anywhere under the folder or in
    `labels_dir`; `labels_name` (`{slide}_mask.tiff`, PANDA's train_label_masks) is how the
    annotations in `labels_dir` are named, when not like their slides. Two slides with one
    name (`site1/s.svs`, `site2/s.svs`) are an error, unless `unique_ids` (`dsf sheet`, whose
    sheet then fixes the ids) names them by their path under `folder` (`site1_s`, `site2_s`),
    except a name in `keep_ids` (an earlier run's slide: renamed, it would lose its artifacts
    and its fold). Raises ConfigError when the folder is missing or holds no slide.
    """
    if labels_name is not None and labels_dir is None:
        raise ConfigError(
            f"--labels-name {labels_name!r} names the files of a labels folder: give --labels"
        )
    folder = Path(folder).absolute()  # absolute, but symlinks kept as the user named them
    if not folder.is_dir():
        what = (
            "is a file, not a folder: give the folder that holds it"
            if folder.exists()
            else ("not found")
        )
        raise ConfigError(f"slide folder {folder} {what}")
    labels = Path(labels_dir).absolute() if labels_dir is not None else None
    if labels is not None and not labels.is_dir():
        raise ConfigError(f"labels folder {labels} not found")
    skip = {Path(p).resolve() for p in exclude}
    if labels is not None:
        skip.add(labels.resolve())
    links: dict[Path, list[Path]] = {}
    walked = list(_walk(folder, skip, names=links))
    reals = {name: real for real, named in links.items() for name in named}

    def real_of(f: Path) -> Path:
        """`f` resolved, from the walk where it was met (a mask in the labels folder: here)."""
        return reals.get(f) or f.resolve()

    files = [f for f in walked if ".labels." not in f.name.lower()]
    if labels is not None and masks:
        files += [f for f in _walk(labels, set()) if ".labels." not in f.name.lower()]
    files, class_masks = _split_masks(files, masks or {})
    if labels is not None:
        files = [f for f in files if not f.is_relative_to(labels)]
    parts: set[Path] = set()
    for f in files:
        if f.suffix.lower() == ".vms":
            parts |= _vms_parts(f)
    slides: list[Path] = []
    dicom_dirs: dict[Path, list[Path]] = {}
    unread = [f for f in files if f.suffix.lower() in UNREAD_FORMATS]
    for f in files:
        suffix = f.suffix.lower()
        if suffix not in SLIDE_SUFFIXES or real_of(f) in parts:
            continue
        if suffix == ".dcm":
            if f.parent not in dicom_dirs:  # the folder is the slide, in the files' order
                slides.append(f.parent)
            dicom_dirs.setdefault(f.parent, []).append(f)
            continue
        slides.append(f)
    _warn_mask_like(slides, masks)
    index = _label_index(labels, labels_name)
    beside: Beside = {}
    slides = [
        _one_name(f, links[real_of(f)], index, beside) if len(links.get(real_of(f), ())) > 1 else f
        for f in slides
    ]
    found: list[tuple[Path, Path]] = []  # (the slide file or DICOM folder, the file to read)
    names: dict[Path, str] = {}  # the name a slide's id comes from
    patients: dict[Path, str | None] = {}
    for entry in slides:
        path = entry
        names[entry] = slide_id(entry.name)
        if entry in dicom_dirs:
            dicom = dicom_slide(entry, dicom_dirs[entry])
            if dicom is None:
                log.warning(
                    "%s: its DICOM files hold no whole-slide image (annotations or "
                    "segmentations?); not a slide",
                    entry,
                )
                continue
            path, patients[path] = dicom.path, dicom.patient
            if dicom.container and _UID_FOLDER.fullmatch(entry.name):
                names[entry] = slide_id(dicom.container)  # its barcode, not a UID
        found.append((entry, path))
    ids = _slide_ids(folder, [entry for entry, _ in found], names, unique_ids, set(keep_ids))
    rows: list[dict[str, Any]] = []
    unused: list[str] = []  # annotation files beside slides whose per-class masks are used
    stems = Counter((entry.parent, _stem(entry.name)) for entry, _ in found)
    matched: set[Path] = set()  # the annotation files some slide takes
    for entry, path in found:
        sid = ids[entry]
        name = names[entry]
        if name not in class_masks:  # a DICOM slide's masks may be named by its folder
            name_masks = class_masks.get(slide_id(entry.name), {})
        else:
            name_masks = class_masks[name]
        if sid != name and (index.get(name) or name_masks):
            theirs = [*index.get(name, []), *name_masks.values()]
            raise ConfigError(
                f"slides under {folder} share the name {name!r}, so {theirs[0]} cannot be told "
                f"to one of them ({entry} is one); rename the slides so their names differ, or "
                "write their sheet by hand"
            )
        rows.append(
            {
                "slide": sid,
                "path": str(path),
                "mpp": mpp,
                "labels": _find_labels(
                    entry, sid, index, beside, stems[entry.parent, _stem(entry.name)] > 1
                ),
                "group": patients.get(path) or patient_group(name),
                "fold": None,
                "masks": {cls: str(p) for cls, p in sorted(name_masks.items())},
            }
        )
        if rows[-1]["labels"]:
            matched.add(Path(rows[-1]["labels"]))
        if rows[-1]["labels"] and rows[-1]["masks"]:
            unused.append(Path(rows[-1]["labels"]).name)
            rows[-1]["labels"] = None
    if not rows:
        raise ConfigError(
            f"no slide found under {folder} (looked for {', '.join(sorted(SLIDE_SUFFIXES))})"
            + (f"; it holds {_unread_note(unread)}: convert them to {CONVERT_TO}" if unread else "")
        )
    if unread:
        log.warning("%s, left out of the run: convert them to %s", _unread_note(unread), CONVERT_TO)
    if unused:
        log.warning(
            "per-class masks (labels.masks) are the annotation of %d slide(s) that also have "
            "an annotation file beside them, which is not used: %s",
            len(unused),
            some(unused),
        )
    # per-class masks in a labels folder are taken through labels.masks, not by name
    matched |= {p for found_masks in class_masks.values() for p in found_masks.values()}
    _warn_unmatched(walked, index, matched)
    if masks:
        _warn_missing_masks(rows, masks, {sid: names[e] for e, sid in ids.items()})
    stated = set(patients.values())
    if len(patients) > 1 and len(stated) == 1 and None not in stated:
        log.warning(
            "all %d DICOM slides state one PatientID (%s), so they form one group and land in "
            "one fold; if that PatientID is an anonymised placeholder, write a sheet (`dsf "
            "sheet`) and fill its `group` column",
            len(patients),
            stated.pop(),
        )
    return rows

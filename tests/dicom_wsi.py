"""Write small DICOM VL Whole Slide Microscopy images for the reader tests (pydicom).

A DICOM slide is a folder of instances of one series: one per pyramid level (TILED_FULL frames,
JPEG baseline or uncompressed RGB) and optional associated images (label, overview), as Imaging
Data Commons and DICOM-converting scanners deliver them. Pixel spacing is stated in mm in the
shared functional groups, as OpenSlide reads it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

VL_WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"
#: Microscopy Bulk Simple Annotations: Imaging Data Commons keeps them in series of their own
ANNOTATIONS = "1.2.840.10008.5.1.4.1.1.91.1"


def _frames(rgb: np.ndarray, tile: int) -> list[bytes]:
    """The image cut into tile x tile JPEG frames in raster order, padded with white."""
    h, w = rgb.shape[:2]
    out = []
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            frame = np.full((tile, tile, 3), 255, np.uint8)
            part = rgb[y : y + tile, x : x + tile]
            frame[: part.shape[0], : part.shape[1]] = part
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, "JPEG", quality=95, subsampling=1)  # 4:2:2
            out.append(buf.getvalue())
    return out


def write_instance(
    path: Path,
    rgb: np.ndarray,
    *,
    image_type: list[str],
    mpp: float,
    tile: int,
    series: str,
    study: str,
    patient: str = "",
    sop_class: str = VL_WSI,
    container: str = "",
) -> None:
    """One instance: `rgb` as TILED_FULL JPEG frames with its pixel spacing (mpp in um)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient
    if container:
        ds.ContainerIdentifier = container  # the slide's barcode
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "SM"
    ds.ImageType = image_type
    frames = _frames(rgb, tile)
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = rgb.shape[:2]
    ds.TotalPixelMatrixFocalPlanes = ds.NumberOfOpticalPaths = 1
    ds.NumberOfFrames = len(frames)
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    spacing = Dataset()
    spacing.PixelSpacing = [mpp / 1000.0, mpp / 1000.0]  # mm: row, column
    spacing.SliceThickness = 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = [spacing]
    ds.SharedFunctionalGroupsSequence = [shared]
    optical = Dataset()
    optical.OpticalPathIdentifier, optical.ObjectiveLensPower = "1", 20
    ds.OpticalPathSequence = [optical]
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def write_dicom_slide(
    folder: Path,
    rgb: np.ndarray,
    mpp: float,
    tile: int = 128,
    levels: int = 2,
    patient: str = "",
    container: str = "",
) -> list[Path]:
    """A slide as a folder of instances: `levels` pyramid levels (each half the last) and a
    label image, named so that the label sorts first (file names carry no meaning in DICOM)."""
    folder.mkdir(parents=True, exist_ok=True)
    series, study = generate_uid(), generate_uid()
    paths = [folder / "0-label.dcm"]
    label = np.full((64, 128, 3), 200, np.uint8)
    write_instance(
        paths[0], label, image_type=["ORIGINAL", "PRIMARY", "LABEL", "NONE"], mpp=50.0,
        tile=64, series=series, study=study, patient=patient,
    )  # fmt: skip
    image = rgb
    for level in range(levels):
        kind = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        if level:
            kind = ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
            image = np.asarray(Image.fromarray(image).reduce(2))
        paths.append(folder / f"level{level}.dcm")
        write_instance(
            paths[-1], image, image_type=kind, mpp=mpp * 2**level, tile=tile, series=series,
            study=study, patient=patient, container=container,
        )  # fmt: skip
    return paths

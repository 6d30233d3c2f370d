"""Tissue labels as DICOM Segmentation (SEG) objects: write one from a CT series, read one back;
and any binary SEG (e.g. dcmqi's) as a mask on a CT image (:func:`load_dicom_seg`).

A SEG written here holds one segment per tissue of :mod:`sarco_app.labels` (muscle, SAT, VAT,
IMAT: segment number = label value), each with its label, display colour and coded terms, and
references every instance of the source series, frame by frame. highdicom builds it (binary
segmentation, empty frames left out). Coded terms (SNOMED CT, scheme ``SCT``):

=======  ==================  =========================================  ================================
segment  category            property type                              anatomic region
=======  ==================  =========================================  ================================
muscle   85756007 Tissue     127954009 Skeletal muscle                  —
SAT      85756007 Tissue     67769002 Subcutaneous adipose tissue       —
VAT      85756007 Tissue     55603005 Adipose tissue                    52731004 Abdominal cavity
IMAT     85756007 Tissue     55603005 Adipose tissue                    127954009 Skeletal muscle
=======  ==================  =========================================  ================================

SNOMED has no pre-coordinated concept for visceral or intermuscular fat, so those two are
adipose tissue qualified by where it lies. Reading maps a segment to a tissue by its label
(``muscle``, ``sat``, ``vat``, ``imat``, as written here) or else by these codes, so SEGs from
other tools with the same terms read too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sarco_app import __version__

from sarco_app.errors import IngestError, SarcoError
from sarco_app.inputs import dicom, ingest
from sarco_app.labels import COLORS, IMAT, LABELS, MUSCLE, NAMES, SAT, VAT
from sarco_app.measurement.quantify import check_label

#: (scheme, value, meaning) of each tissue's property type and optional anatomic region.
TISSUE_TYPE_CODES: dict[int, tuple[str, str, str]] = {
    MUSCLE: ("SCT", "127954009", "Skeletal muscle"),
    SAT: ("SCT", "67769002", "Subcutaneous adipose tissue"),
    VAT: ("SCT", "55603005", "Adipose tissue"),
    IMAT: ("SCT", "55603005", "Adipose tissue"),
}
TISSUE_REGION_CODES: dict[int, tuple[str, str, str]] = {
    VAT: ("SCT", "52731004", "Abdominal cavity"),
    IMAT: ("SCT", "127954009", "Skeletal muscle"),
}
TISSUE_CATEGORY_CODE = ("SCT", "85756007", "Tissue")
#: Human-readable segment descriptions (SegmentDescription is limited to 64 characters).
TISSUE_DESCRIPTIONS: dict[int, str] = {
    MUSCLE: "Skeletal muscle",
    SAT: "Subcutaneous adipose tissue",
    VAT: "Visceral adipose tissue",
    IMAT: "Intermuscular adipose tissue",
}
_SEG_SERIES_DESCRIPTION = "sarco body composition"


def _code(triple: tuple[str, str, str]):
    from pydicom.sr.coding import Code

    scheme, value, meaning = triple
    return Code(value, scheme, meaning)


def dicom_cielab(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """An sRGB colour (0-255) as DICOM's RecommendedDisplayCIELabValue (three 16-bit ints)."""
    import highdicom as hd
    from skimage.color import rgb2lab

    l_star, a_star, b_star = rgb2lab(np.array([[rgb]], dtype=float) / 255.0)[0, 0]
    clip = lambda v: float(np.clip(v, -128.0, 127.0))  # noqa: E731
    return hd.color.CIELabColor(float(np.clip(l_star, 0.0, 100.0)), clip(a_star), clip(b_star)).value


def segment_descriptions(algorithm: str | None = None) -> list:
    """highdicom SegmentDescriptions of the four tissues, numbered by label value.

    ``algorithm`` names the model when the label was made automatically (``None``: manual).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if algorithm:
        algorithm_type = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        identification = hd.AlgorithmIdentificationSequence(
            name=algorithm, version=__version__, family=codes.cid7162.ArtificialIntelligence
        )
    else:
        algorithm_type, identification = hd.seg.SegmentAlgorithmTypeValues.MANUAL, None
    out = []
    for value in sorted(NAMES):
        description = hd.seg.SegmentDescription(
            segment_number=value,
            segment_label=NAMES[value],
            segmented_property_category=_code(TISSUE_CATEGORY_CODE),
            segmented_property_type=_code(TISSUE_TYPE_CODES[value]),
            algorithm_type=algorithm_type,
            algorithm_identification=identification,
            anatomic_regions=[_code(TISSUE_REGION_CODES[value])] if value in TISSUE_REGION_CODES else None,
        )
        description.SegmentDescription = TISSUE_DESCRIPTIONS[value]
        # RecommendedDisplayCIELabValue: the overlay colours of labels.COLORS, in DICOM's
        # scaled CIELab (what OHIF and Slicer use to colour the segment).
        description.RecommendedDisplayCIELabValue = list(dicom_cielab(COLORS[value]))
        out.append(description)
    return out


def series_datasets(series_path: str | Path, image: ingest.CTImage) -> list:
    """The DICOM datasets of ``image``'s series under ``series_path``, in the order of the
    image file's slices (axis 2 of ``image.to_original``).

    Raises :class:`SarcoError` when instances lack the UIDs a SEG must reference.
    """
    found = dicom.list_series(series_path)
    chosen = next((s for s in found if s.key == image.meta.get("series_key")), None)
    if chosen is None:  # list_series and load_dicom read the same files: this is a bug
        raise SarcoError(f"{series_path}: series {image.meta.get('series_key')} not found again")
    by_uid = {str(ds.get("SOPInstanceUID", "") or ""): ds for ds in chosen.datasets}
    missing = [
        getattr(ds, "filename_for_messages", "?")
        for ds in chosen.datasets
        if not all(str(ds.get(tag, "") or "").strip()
                   for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    ]
    if missing or len(by_uid) != len(chosen.datasets):
        names = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise SarcoError(
            f"{series_path}: instances without Study/Series/SOP Instance UIDs ({names or 'duplicate SOP UIDs'}); "
            "a DICOM SEG must reference them: give them UIDs first (sarco_app.inputs.dicom_seg.repair_uids)"
        )
    return [by_uid[uid] for uid in image.meta["sop_instance_uids"]]


def seg_uids(source_series_uid: str, tag: str = "final") -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the SEG of a source series and label tag.

    Deterministic, so saving the same series' label again replaces that SEG (in a PACS that
    overwrites instances with the same UID, as ``scripts/run_pacs.py`` configures Orthanc) and
    never any other object.
    """
    from pydicom.uid import generate_uid

    return (generate_uid(entropy_srcs=["sarco-seg-series", source_series_uid, tag]),
            generate_uid(entropy_srcs=["sarco-seg-instance", source_series_uid, tag]))


#: Type 2 patient/study attributes a SEG copies from its source; anonymised CT often lacks them.
_COPIED_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID",
                 "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName")


def _with_patient_study_tags(ds: Any) -> Any:
    """``ds``, or a shallow copy with the missing type 2 attributes present and empty."""
    missing = [keyword for keyword in _COPIED_TYPE2 if keyword not in ds]
    if not missing:
        return ds
    copy = ds.copy()
    for keyword in missing:
        setattr(copy, keyword, "")
    return copy


def build_seg(
    datasets: Sequence[Any],
    image: ingest.CTImage,
    label: np.ndarray,
    *,
    tag: str = "final",
    algorithm: str | None = None,
):
    """A highdicom Segmentation of ``label`` (canonical grid of ``image``, values 0-4) on the
    source ``datasets`` (from :func:`series_datasets`).

    Raises :class:`SarcoError` when the label's shape differs from the image or it holds values
    other than 0-4.
    """
    import highdicom as hd

    label = np.asarray(label)
    if label.shape != image.hu.shape:
        raise SarcoError(f"label shape {label.shape} differs from the series' shape {image.hu.shape}")
    label = check_label(label)
    original = image.to_original(label)
    if original.ndim == 2:
        original = original[:, :, None]
    # Canonical-to-file order gives (column, row, slice); a SEG frame is (row, column).
    frames = np.ascontiguousarray(original.transpose(2, 1, 0))
    if frames.shape[0] != len(datasets):
        raise SarcoError(f"label has {frames.shape[0]} slices but the series has {len(datasets)} instances")
    datasets = [_with_patient_study_tags(ds) for ds in datasets]
    source_series = str(datasets[0].SeriesInstanceUID)
    series_uid, sop_uid = seg_uids(source_series, tag)
    return hd.seg.Segmentation(
        source_images=list(datasets),
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(algorithm),
        series_instance_uid=series_uid,
        series_number=int(datasets[0].get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="sarco",
        manufacturer_model_name="sarco body composition",
        software_versions=__version__,
        device_serial_number="0",
        series_description=f"{_SEG_SERIES_DESCRIPTION} ({tag})"[:64],
        content_label="BODYCOMP",
        content_description=f"Body composition label ({tag})",
    )


def write_seg(series_path: str | Path, label: np.ndarray, out: str | Path, *, series: str | int | None = None,
              tag: str = "final", algorithm: str | None = None) -> Path:
    """Write ``label`` (canonical grid of the series, values 0-4) as a DICOM SEG file ``out``
    referencing the CT series at ``series_path`` (folder, zip or file; ``series`` as in
    :func:`sarco_app.inputs.ingest.load_dicom`)."""
    image = ingest.load_dicom(series_path, series=series)
    seg = build_seg(series_datasets(series_path, image), image, label, tag=tag, algorithm=algorithm)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(str(out))
    return out


#: SOP Class UID of a DICOM Segmentation object.
SEGMENTATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def read_dicom_seg(path: str | Path) -> Any:
    """A DICOM Segmentation file as a pydicom Dataset; :class:`IngestError` for a file that is
    not DICOM or not a SEG."""
    import pydicom

    path = Path(path)
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:  # pydicom raises many types for a file that is not DICOM
        raise IngestError(f"{path.name}: not a DICOM file ({exc})") from exc
    if str(ds.get("SOPClassUID", "")) != SEGMENTATION_SOP_CLASS:
        raise IngestError(f"{path.name}: not a DICOM Segmentation (SOP class {ds.get('SOPClassUID', '?')})")
    ds.filename_for_messages = path.name
    return ds


def load_dicom_seg(path: Any, image: ingest.CTImage, segment: int | None = None) -> np.ndarray:
    """A binary DICOM SEG (e.g. dcmqi's) as a boolean mask on ``image``'s canonical grid.

    ``path`` is a file or a Dataset from :func:`read_dicom_seg`. Every set pixel of every frame
    (of segment number ``segment``, or of any segment) is placed by its frame's position and
    orientation (patient coordinates, mm) in the voxel of ``image`` that holds it; pixels
    outside the image are dropped. Raises :class:`IngestError` for a file that is not a DICOM
    SEG or lacks the geometry.
    """
    ds = path if hasattr(path, "SOPClassUID") else read_dicom_seg(path)
    path = Path(getattr(ds, "filename_for_messages", "SEG"))
    try:
        frames = np.asarray(ds.pixel_array)
    except Exception as exc:  # a truncated file: no or short pixel data
        raise IngestError(f"{path.name}: the SEG's pixel data cannot be read ({exc})") from None
    frames = frames[None] if frames.ndim == 2 else frames
    shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != frames.shape[0]:
        raise IngestError(f"{path.name}: {frames.shape[0]} frames but {len(per_frame)} per-frame geometries")

    def item(group, name):
        for source in (group, shared):
            if source is not None and name in source:
                return source[name][0]
        raise IngestError(f"{path.name}: no {name} for a frame")

    to_voxel = np.linalg.inv(np.asarray(image.affine, dtype=float))
    mask = np.zeros(image.hu.shape, dtype=bool)
    drawn = 0  # set pixels of the chosen frames, to notice a SEG that lies off this image
    for frame, group in zip(frames, per_frame):
        if segment is not None and int(item(group, "SegmentIdentificationSequence").ReferencedSegmentNumber) != segment:
            continue
        rows, cols = np.nonzero(frame)
        if rows.size == 0:
            continue
        drawn += rows.size
        position = np.array(item(group, "PlanePositionSequence").ImagePositionPatient, dtype=float)
        cosines = np.array(item(group, "PlaneOrientationSequence").ImageOrientationPatient, dtype=float)
        row_mm, col_mm = (float(v) for v in item(group, "PixelMeasuresSequence").PixelSpacing)
        # DICOM: column index runs along the first cosine, row index along the second (LPS, mm).
        lps = position + np.outer(cols * col_mm, cosines[:3]) + np.outer(rows * row_mm, cosines[3:])
        ras = lps * np.array([-1.0, -1.0, 1.0])
        voxel = np.rint(ras @ to_voxel[:3, :3].T + to_voxel[:3, 3]).astype(int)
        if image.hu.ndim == 2:
            voxel = voxel[:, :2]
        inside = np.all((voxel >= 0) & (voxel < np.array(image.hu.shape)), axis=1)
        mask[tuple(voxel[inside].T)] = True
    if drawn and not mask.any():
        # Without series UIDs to compare, the geometry tells: not one pixel lands on this image.
        raise IngestError(f"{path.name}: none of its {drawn} segment pixels lies on this image's slices "
                          "(a SEG of another series or study?)")
    return mask


def segment_tissue(item: Any) -> int | None:
    """The label value a SEG segment (a SegmentSequence item) stands for: by its label, or
    else by its coded property type (and anatomic region); ``None`` when neither fits."""
    name = str(item.get("SegmentLabel", "") or "").strip().lower()
    if name in LABELS:
        return LABELS[name]
    try:
        type_code = str(item.SegmentedPropertyTypeCodeSequence[0].CodeValue)
    except (AttributeError, IndexError):
        return None
    regions = {str(r.CodeValue) for r in item.get("AnatomicRegionSequence", []) or []}
    for value, (_, code, _) in TISSUE_TYPE_CODES.items():
        region = TISSUE_REGION_CODES.get(value)
        if code == type_code and (region is None or region[1] in regions):
            if region is None and type_code == TISSUE_TYPE_CODES[VAT][1]:
                continue  # plain "adipose tissue" says neither VAT nor IMAT
            return value
    return None


def referenced_series(seg: Any) -> set[str]:
    """SeriesInstanceUIDs a SEG dataset references (ReferencedSeriesSequence)."""
    return {str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", []) or []}


def seg_to_label(seg: Any, image: ingest.CTImage) -> np.ndarray:
    """A SEG (file path or Dataset) as a canonical uint8 label map of ``image``.

    Raises :class:`SarcoError` when the SEG references another series than ``image`` (when both
    have UIDs) or holds a segment that is none of the four tissues.
    """
    ds = seg if hasattr(seg, "SOPClassUID") else read_dicom_seg(seg)
    name = getattr(ds, "filename_for_messages", "SEG")
    series_uid = str(image.meta.get("series_uid", "") or "")
    refs = referenced_series(ds)
    if series_uid and refs and series_uid not in refs:
        raise SarcoError(
            f"{name} references series {', '.join(sorted(refs))}, not this image's series {series_uid}"
        )
    label = np.zeros(image.hu.shape, dtype=np.uint8)
    for item in ds.get("SegmentSequence", []) or []:
        value = segment_tissue(item)
        if value is None:
            raise SarcoError(
                f"{name}: segment {item.SegmentNumber} ({item.get('SegmentLabel', '')!r}) is not muscle, "
                "SAT, VAT or IMAT"
            )
        label[load_dicom_seg(ds, image, segment=int(item.SegmentNumber))] = value
    return label


def read_seg(seg_path: str | Path, series_path: str | Path, series: str | int | None = None) -> tuple[ingest.CTImage, np.ndarray]:
    """(image, canonical label) of a SEG file on the CT series at ``series_path``."""
    image = ingest.load_dicom(series_path, series=series)
    return image, seg_to_label(seg_path, image)

"""The AI-results Structured Report of one prediction (IHE AI Results profile, TID 1500).

Document layout (PS3.16 TID 1500 "Measurement Report", built with highdicom):

* root CONTAINER "Imaging Measurement Report" (DCM 126000) with language, a **device**
  observer context (TID 1004: the node), and the procedure reported, i.e. the *imaging*
  procedure from CID 100 (CT or MRI), never the algorithm;
* "Imaging Measurements" holding ONE measurement group with the finding "First pass
  effect", the algorithm identification (TID 4019: name, version, parameters threshold /
  weights SHA-256 / variant / precision / calibrated / demonstration / recipe), the numeric
  result (a *probability* in ``%`` only when the checkpoint is calibrated, otherwise a plain
  *score* in ``{score}``), the decision threshold on the same scale, and the qualitative
  finding "likely" / "unlikely" at that threshold. When the attention map has a peak (issue
  6) the group is a TID 1410 planar ROI on that source image: a closed SCOORD POLYLINE around
  the hot spot and a tracking identifier a radiologist can read, e.g.
  ``FPE 73% (research use)``; viewers that draw SR measurements (OHIF) show it over the
  slice. Without a peak it is a TID 1501 group;
* a root "Qualitative Evaluations" container (TID 1500 rows 12-14) with the study-level
  finding (IHE AI Results), the intended-use statement ("Research use only. Not for
  diagnosis."), the demonstration-weights flag, the reason when a study was not analysed,
  and processing notes.

The header copies patient and study from the primary series, opens a new series, lists every
source instance as evidence (PS3.3 C.17.2), flags the document UNVERIFIED, declares the
private coding scheme and names the node as Contributing Equipment with purpose "Processing
Algorithm" (DCM 109103).

Versions (PS3.3 C.17.2.3): a re-run builds a new SR with new UIDs whose Predecessor
Documents Sequence names the SR(s) it supersedes; nothing is ever overwritten.

SR class fallback: the content holds no SCOORD3D and no by-reference relationships, so the
same tree is valid as Comprehensive 3D SR, Comprehensive SR and Enhanced SR.
:func:`reencode_sr` re-encodes a built SR as another class with a SOP Instance UID derived
deterministically from the original (a SOP Instance UID names one instance of one class;
re-sending the same fallback always carries the same UID).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict, cast

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    ContainerContentItem,
    ContentItem,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageRegion,
    Measurement,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from highdicom.sr.templates import DEFAULT_LANGUAGE, LanguageOfContentItemAndDescendants
from highdicom.sr.value_types import ContentSequence
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import UID

from inference.result import AttentionPeak, ModelInfo, NotAnalysed, Prediction, SourceInstance
from reports.codes import Fpe, Std, coding_scheme_identification, procedure_reported
from reports.header import REQUIRED_UIDS, TolerantPatientCopy, required_uid, source_header
from reports.uids import UIDFactory, is_valid_uid

__all__ = [
    "ReportContext",
    "PriorReport",
    "SRClass",
    "SR_CLASS_UIDS",
    "FALLBACK_ORDER",
    "RESEARCH_STATEMENT",
    "build_sr",
    "declare_character_set",
    "reencode_sr",
    "result_text",
]

logger = logging.getLogger(__name__)

# highdicom warns about single-component person names it copies from the source images, and
# its message quotes the name: a patient name must never reach the node's logs (which capture
# warnings). The node copies the source's name unchanged, so the warning says nothing useful.
warnings.filterwarnings(
    "ignore", message=r"The string .* is unlikely to represent the intended person name", category=UserWarning
)

SRClass = Literal["comprehensive3d", "comprehensive", "enhanced"]
SR_CLASS_UIDS: dict[SRClass, str] = {
    "comprehensive3d": "1.2.840.10008.5.1.4.1.1.88.34",
    "comprehensive": "1.2.840.10008.5.1.4.1.1.88.33",
    "enhanced": "1.2.840.10008.5.1.4.1.1.88.22",
}
# Order in which a sender tries the classes when an archive refuses one (issue 4 item 4).
FALLBACK_ORDER: tuple[SRClass, ...] = ("comprehensive3d", "comprehensive", "enhanced")
RESEARCH_STATEMENT = "Research use only. Not for diagnosis."
DEMONSTRATION_STATEMENT = "Untrained demonstration weights: this result is random and means nothing."
MANUFACTURER = "fpe-node"
DEFAULT_SR_SERIES_NUMBER = 9901


@dataclass(frozen=True)
class ReportContext:
    """What the node says about itself in every result object.

    Parameters
    ----------
    software_version:
        fpe-node's version (SoftwareVersions, Contributing Equipment).
    device_uid:
        Stable UID of this node installation: the device observer (TID 1004 "Device
        Observer UID"). Build it once, e.g. ``UIDFactory(root).for_name(ae_title)``.
    device_name:
        Device Observer Name, e.g. the node's AE title.
    institution_name:
        InstitutionName written in the results, or ``None``.
    station_name:
        StationName written in Contributing Equipment, or ``None``.
    """

    software_version: str
    device_uid: str
    device_name: str = "fpe-node"
    institution_name: str | None = None
    station_name: str | None = None

    def __post_init__(self) -> None:
        if not is_valid_uid(self.device_uid):
            raise ValueError(f"device_uid {self.device_uid!r} is not a UID")
        if not self.software_version:
            raise ValueError("software_version is empty")


@dataclass(frozen=True)
class PriorReport:
    """An SR that a new SR supersedes (an item of the Predecessor Documents Sequence)."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> "PriorReport":
        """The reference to an SR that was built (or read back) earlier."""
        return cls(
            study_uid=str(dataset.StudyInstanceUID),
            series_uid=str(dataset.SeriesInstanceUID),
            sop_class_uid=str(dataset.SOPClassUID),
            sop_instance_uid=str(dataset.SOPInstanceUID),
        )


def value_concept(model: ModelInfo) -> tuple[CodedConcept, CodedConcept]:
    """Concept name and UCUM unit of the numeric result.

    A calibrated model gives a probability, reported in percent; otherwise the value is an
    uncalibrated score in [0, 1], named and unit-ed as a score so that nobody reads it as a
    probability.
    """
    if model.calibrated:
        return Fpe.PROBABILITY, Std.PERCENT
    return Fpe.SCORE, Std.SCORE_UNIT


def _scaled(value: float, model: ModelInfo) -> float:
    return round(100.0 * value, 2) if model.calibrated else round(value, 4)


def result_text(prediction: Prediction) -> str:
    """The short label a radiologist reads, e.g. ``FPE 73% (research use)``.

    Used as the TID 1410 tracking identifier and burned into the secondary captures.
    """
    if prediction.model.calibrated:
        label = f"FPE {100.0 * prediction.score:.0f}%"
    else:
        label = f"FPE score {prediction.score:.2f}"
    if prediction.model.demonstration:
        label += " DEMO"
    return f"{label} (research use)"


def finding_concept(prediction: Prediction) -> CodedConcept:
    """FPE likely / unlikely at the model's threshold."""
    return Fpe.LIKELY if prediction.positive else Fpe.UNLIKELY


def algorithm_identification(model: ModelInfo) -> AlgorithmIdentification:
    """TID 4019 Algorithm Identification with the parameters that make the result reproducible."""
    parameters = [
        f"threshold={model.threshold:g}",
        f"weights_sha256={model.weights_sha256}",
        f"variant={model.variant}",
        f"precision={model.precision}",
        f"calibrated={str(model.calibrated).lower()}",
        f"demonstration={str(model.demonstration).lower()}",
        f"recipe={'checkpoint' if model.recipe_from_checkpoint else 'default'}",
    ]
    return AlgorithmIdentification(name=model.name, version=model.version, parameters=parameters)


def _observation_context(context: ReportContext, model_name: str | None) -> ObservationContext:
    """TID 1001 with a device observer (TID 1004): the node, not a person, made the report."""
    device = DeviceObserverIdentifyingAttributes(
        uid=context.device_uid,
        name=context.device_name,
        manufacturer_name=MANUFACTURER,
        model_name=model_name,
    )
    return ObservationContext(
        observer_device_context=ObserverContext(observer_type=dcm_codes.DCM.Device, observer_identifying_attributes=device)
    )


def _measurements(prediction: Prediction, algorithm: AlgorithmIdentification | None) -> list[Measurement]:
    """TID 300 measurements: the result (with its algorithm, TID 4019) and the threshold.

    Each carries the finding site Brain as its own concept modifier (TID 300 row 6, "Finding
    Site"), not the group: OHIF 3.13 labels a group-level SCT finding site with its code value
    in the text over the image ("363698007: Brain", cornerstone-dicom-sr
    ``_processTID1410Measurement``), while it shows each NUM as "<concept meaning>: <value>
    <unit>", in words.
    """
    name, unit = value_concept(prediction.model)
    site = [FindingSite(anatomic_location=Std.BRAIN)]
    value = Measurement(name=name, value=_scaled(prediction.score, prediction.model), unit=unit, algorithm_id=algorithm,
                        finding_sites=site)
    threshold = Measurement(name=Fpe.DECISION_THRESHOLD, value=_scaled(prediction.model.threshold, prediction.model),
                            unit=unit, finding_sites=site)
    return [value, threshold]


def _outline(peak: AttentionPeak) -> np.ndarray:
    """SCOORD graphic data of the peak's closed outline, (column, row) pairs (PS3.3 C.18.6.1.1)."""
    points = np.asarray(peak.outline, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3:
        raise ValueError(f"attention peak outline needs at least 3 (column, row) points, got shape {points.shape}")
    if not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    if len(np.unique(points, axis=0)) < 3:
        raise ValueError("attention peak outline needs at least 3 distinct points")
    return points


class _GroupContent(TypedDict):
    """Keyword arguments both measurement-group classes take (typed, so mypy checks the call)."""

    tracking_identifier: TrackingIdentifier
    finding_type: CodedConcept
    algorithm_id: AlgorithmIdentification
    finding_sites: list[FindingSite]
    measurements: list[Measurement]
    qualitative_evaluations: list[QualitativeEvaluation]


def _group_content(prediction: Prediction, algorithm: AlgorithmIdentification, tracking_uid: str) -> _GroupContent:
    """The content TID 1410 and TID 1501 groups share: tracking, finding, algorithm, site, measurements."""
    return {
        "tracking_identifier": TrackingIdentifier(uid=tracking_uid, identifier=result_text(prediction)),
        "finding_type": Fpe.FIRST_PASS_EFFECT,
        "algorithm_id": algorithm,
        "finding_sites": [],  # on each measurement instead (_measurements)
        "measurements": _measurements(prediction, None),
        "qualitative_evaluations": [
            QualitativeEvaluation(name=Fpe.FIRST_PASS_EFFECT, value=finding_concept(prediction))
        ],
    }


def _peak_group(
    prediction: Prediction, peak: AttentionPeak, algorithm: AlgorithmIdentification, tracking_uid: str
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410: the result anchored on the source image where the attention peaks (issue 6 item 1)."""
    frames = [peak.source.frame] if peak.source.frame is not None else None
    region = ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=_outline(peak),
        source_image=SourceImageForRegion(
            referenced_sop_class_uid=peak.source.sop_class_uid,
            referenced_sop_instance_uid=peak.source.sop_instance_uid,
            referenced_frame_numbers=frames,
        ),
    )
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        referenced_region=region, **_group_content(prediction, algorithm, tracking_uid)
    )


def _study_group(
    prediction: Prediction, algorithm: AlgorithmIdentification, tracking_uid: str
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501: the result without an image region (a prediction that has no attention peak)."""
    return MeasurementsAndQualitativeEvaluations(**_group_content(prediction, algorithm, tracking_uid))


def _result_group(
    prediction: Prediction, tracking_uid: str
) -> PlanarROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations:
    """The one measurement group: anchored on the attention peak when there is one (TID 1410)."""
    algorithm = algorithm_identification(prediction.model)
    if prediction.peak is not None:
        return _peak_group(prediction, prediction.peak, algorithm, tracking_uid)
    return _study_group(prediction, algorithm, tracking_uid)


def _container(name: CodedConcept, items: Sequence[ContentItem]) -> ContainerContentItem:
    container = ContainerContentItem(name=name, relationship_type=RelationshipTypeValues.CONTAINS)
    container.ContentSequence = ContentSequence(items)
    return container


def _text(name: CodedConcept, value: str) -> TextContentItem:
    return TextContentItem(name=name, value=value[:1024], relationship_type=RelationshipTypeValues.CONTAINS)


def _code(name: CodedConcept, value: CodedConcept) -> CodeContentItem:
    return CodeContentItem(name=name, value=value, relationship_type=RelationshipTypeValues.CONTAINS)


def _qualitative_evaluations(result: Prediction | NotAnalysed) -> ContainerContentItem:
    """TID 1500 rows 12-14: the study-level finding and the report-level statements.

    IHE AI Results puts findings not tied to an image region here: FPE likely / unlikely
    (or "not analysed" with its reason), the intended-use statement, the demonstration flag
    and processing notes.
    """
    if isinstance(result, Prediction):
        demo = result.model.demonstration
        items: list[ContentItem] = [
            _code(Fpe.FIRST_PASS_EFFECT, finding_concept(result)),
            _text(Fpe.INTENDED_USE, RESEARCH_STATEMENT),
            _code(Fpe.DEMONSTRATION_WEIGHTS, Std.YES if demo else Std.NO),
        ]
        if demo:
            items.append(_text(Fpe.PROCESSING_NOTE, DEMONSTRATION_STATEMENT))
    else:
        items = [
            _code(Fpe.FIRST_PASS_EFFECT, Fpe.NOT_ANALYSED),
            _text(Fpe.REASON_NOT_ANALYSED, result.reason),
            _text(Fpe.INTENDED_USE, RESEARCH_STATEMENT),
        ]
    items.extend(_text(Fpe.PROCESSING_NOTE, note) for note in result.warnings)
    return _container(Std.QUALITATIVE_EVALUATIONS, items)


def _content(result: Prediction | NotAnalysed, context: ReportContext, uids: UIDFactory) -> ContainerContentItem:
    """The TID 1500 document tree.

    Rows used: 2 language, 3 observation context (device), 4 procedure reported,
    6 "Imaging Measurements" with ONE measurement group holding the value, the threshold, the
    qualitative finding and the algorithm (TID 4019): a TID 1410 planar ROI on the attention
    peak when there is one, else a TID 1501 group; 12 "Qualitative Evaluations" with the
    study-level finding and the statements. A second, region-free TID 1501 group beside the
    TID 1410 one is avoided on purpose: PixelMed's validator applies one group template to
    all groups of the container and then reports the other kind as errors; row 8 "Derived
    Imaging Measurements" is meant for values derived from several ROIs (TID 1420).
    """
    model_name = result.model.name if isinstance(result, Prediction) else None
    root = ContainerContentItem(name=Std.IMAGING_MEASUREMENT_REPORT, template_id="1500")
    items: list[ContentItem] = [
        *LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE),
        *_observation_context(context, model_name),
        CodeContentItem(
            name=Std.PROCEDURE_REPORTED,
            value=procedure_reported(result.pipeline),
            relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
        ),
    ]
    if isinstance(result, Prediction):
        group = _result_group(result, uids.new())
        items.append(_container(Std.IMAGING_MEASUREMENTS, cast(Sequence[ContentItem], group)))
    items.append(_qualitative_evaluations(result))
    root.ContentSequence = ContentSequence(items)
    return root


def _reference_dataset(instance: SourceInstance | PriorReport) -> Dataset:
    """The UIDs of a referenced instance, an evidence item or a predecessor document, as the
    PS3.3 Hierarchical SOP Instance Reference Macro lists them (study, series, SOP class, instance)."""
    ref = Dataset()
    ref.StudyInstanceUID = instance.study_uid
    ref.SeriesInstanceUID = instance.series_uid
    ref.SOPClassUID = instance.sop_class_uid
    ref.SOPInstanceUID = instance.sop_instance_uid
    return ref


def _uid_reference(header: Dataset) -> Dataset:
    """The four UIDs of a source header: all an evidence item needs (PS3.3 C.17.2.3)."""
    ref = Dataset()
    for keyword in REQUIRED_UIDS:
        setattr(ref, keyword, required_uid(header, keyword))
    return ref


def _evidence(result: Prediction | NotAnalysed, source_datasets: Sequence[Dataset],
              overlays: Sequence[Dataset] = ()) -> list[Dataset]:
    """The primary's first header (patient and study are copied from it), then every source used,
    then the overlay objects built from the result (Parametric Map, Segmentation).

    The first header goes through :func:`reports.header.source_header` (type 2 attributes
    present, values writable); the others are listed by their UIDs only.
    """
    if not source_datasets:
        raise ValueError("build_sr needs at least one source dataset of the primary series (patient and study)")
    evidence = [source_header(source_datasets[0])]
    seen = {str(evidence[0].SOPInstanceUID)}
    for header in source_datasets[1:]:
        reference = _uid_reference(header)
        if str(reference.SOPInstanceUID) not in seen:
            seen.add(str(reference.SOPInstanceUID))
            evidence.append(reference)
    for source in result.sources:
        if source.sop_instance_uid not in seen:
            seen.add(source.sop_instance_uid)
            evidence.append(_reference_dataset(source))
    for overlay in overlays:
        if str(overlay.SOPInstanceUID) not in seen:
            seen.add(str(overlay.SOPInstanceUID))
            evidence.append(_uid_reference(overlay))
    return evidence


class _Comprehensive3DSR(TolerantPatientCopy, hd.sr.Comprehensive3DSR):
    """Comprehensive 3D SR (PS3.3 A.35.13) with the tolerant patient and study copy."""


class _ComprehensiveSR(TolerantPatientCopy, hd.sr.ComprehensiveSR):
    """Comprehensive SR (PS3.3 A.35.3) with the tolerant patient and study copy."""


class _EnhancedSR(TolerantPatientCopy, hd.sr.EnhancedSR):
    """Enhanced SR (PS3.3 A.35.2) with the tolerant patient and study copy."""


_SR_TYPES: dict[SRClass, type[hd.sr.Comprehensive3DSR] | type[hd.sr.ComprehensiveSR] | type[hd.sr.EnhancedSR]] = {
    "comprehensive3d": _Comprehensive3DSR,
    "comprehensive": _ComprehensiveSR,
    "enhanced": _EnhancedSR,
}


def contributing_equipment(
    context: ReportContext, model: ModelInfo | None,
    description: str = "First-pass-effect prediction (research use, not for diagnosis)",
) -> hd.ContributingEquipment:
    """Contributing Equipment (PS3.3 C.7.5.1) of every result object: the node and the model that made it."""
    versions = [context.software_version] + ([f"{model.name} {model.version}"] if model else [])
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=Std.PROCESSING_ALGORITHM,
        manufacturer_model_name=model.name if model else MANUFACTURER,
        software_versions=versions,
        institution_name=context.institution_name,
        station_name=context.station_name,
        contribution_description=description,
    )


def _series_description(result: Prediction | NotAnalysed) -> str:
    if isinstance(result, NotAnalysed):
        return "FPE AI result: not analysed (research use)"
    demo = " DEMO" if result.model.demonstration else ""
    return f"FPE AI result{demo} (research use, not for diagnosis)"[:64]


def build_sr(
    result: Prediction | NotAnalysed,
    source_datasets: Sequence[Dataset],
    uids: UIDFactory,
    context: ReportContext,
    *,
    sr_class: SRClass = "comprehensive3d",
    series_uid: str | None = None,
    series_number: int = DEFAULT_SR_SERIES_NUMBER,
    instance_number: int = 1,
    predecessors: Sequence[PriorReport] = (),
    overlays: Sequence[Dataset] = (),
) -> Dataset:
    """Build the AI-results SR of one prediction (or of a study that was not analysed).

    Parameters
    ----------
    result:
        The prediction, or the reason the study was not analysed.
    source_datasets:
        Headers of the primary series' source images (pixel data not needed). Patient and
        study are copied from the first (PS3.3 C.7.1.1, C.7.2.1), type 2 attributes it lacks
        written empty (:func:`reports.header.source_header`); all are evidence.
    uids:
        Makes the new Series / SOP Instance / tracking UIDs.
    context:
        The node's identity (device observer, contributing equipment).
    sr_class:
        SOP class to encode: Comprehensive 3D SR (default), Comprehensive SR or Enhanced SR.
    series_uid, series_number, instance_number:
        A new series by default.
    predecessors:
        SRs this one supersedes (Predecessor Documents Sequence, PS3.3 C.17.2.3).
    overlays:
        Objects built from the same result and drawn over the primary series (Parametric Map,
        Segmentation): listed in the Current Requested Procedure Evidence Sequence (PS3.3
        C.17.2.3), so a viewer or archive that follows the SR's evidence finds them.

    Returns
    -------
    pydicom.dataset.Dataset
        The SR (a highdicom SR object) with file meta, ready for ``save_as``.

    Raises
    ------
    ValueError
        When there is no source dataset, a source lacks a UID it must have, or the peak
        outline is not a closed polygon.
    """
    sr_type = _SR_TYPES[sr_class]
    model = result.model if isinstance(result, Prediction) else None
    sop_instance_uid = uids.new()
    sr: Dataset = sr_type(
        evidence=_evidence(result, source_datasets, overlays),
        content=_content(result, context, uids),
        series_instance_uid=series_uid or uids.new(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=True,
        is_verified=False,
        institution_name=context.institution_name,
        previous_versions=[_reference_dataset(p) for p in predecessors] or None,
        contributing_equipment=[contributing_equipment(context, model)],
        series_description=_series_description(result),
        manufacturer_model_name=model.name if model else MANUFACTURER,
        software_versions=context.software_version,
    )
    sr.CodingSchemeIdentificationSequence = coding_scheme_identification()
    declare_character_set(sr)
    logger.info(
        "built %s SR %s for study %s (%s)",
        sr_class,
        sop_instance_uid,
        sr.StudyInstanceUID,
        "prediction" if model else "not analysed",
    )
    return sr


_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})


def _has_non_ascii_text(dataset: Dataset) -> bool:
    for element in dataset.iterall():
        if element.VR not in _TEXT_VRS or element.value is None:
            continue
        values = element.value if element.VM > 1 else [element.value]
        if any(not str(value).isascii() for value in values):
            return True
    return False


def declare_character_set(dataset: Dataset) -> None:
    """Make sure every text value can be encoded: UTF-8 (ISO_IR 192) when any is non-ASCII.

    Strict writer: a value copied from a source in another character set, or a site setting
    such as an institution name with accents, must never be written under the default
    repertoire (PS3.5 section 6.1). Values are held decoded, so switching the whole object to
    UTF-8 loses nothing.
    """
    if dataset.get("SpecificCharacterSet") in ("ISO_IR 192", ["ISO_IR 192"]):
        return
    if _has_non_ascii_text(dataset):
        dataset.SpecificCharacterSet = "ISO_IR 192"


def _has_item(items: Sequence[Dataset], predicate_keyword: str, value: str | None = None) -> bool:
    for item in items:
        element = item.get(predicate_keyword)
        if element is not None and (value is None or element == value):
            return True
        if _has_item(item.get("ContentSequence", []), predicate_keyword, value):
            return True
    return False


def reencode_sr(sr: Dataset, sr_class: SRClass, uids: UIDFactory) -> Dataset:
    """The same SR content encoded as another SR class (archive fallback, issue 4 item 4).

    The copy gets SOP Class ``sr_class`` and a SOP Instance UID derived from the original's
    with :meth:`UIDFactory.derive`: deterministic, so every retry of the same fallback
    carries the same UID, and distinct from the original because a SOP Instance UID names one
    instance of one SOP class (PS3.3 C.12.1.1.1). Series, content and dates are unchanged.
    Re-encoding to the original class returns an unchanged copy.

    Raises
    ------
    ValueError
        When the content uses what the target class forbids: SCOORD3D outside Comprehensive
        3D SR, by-reference relationships in Enhanced SR (PS3.3 A.35.1-A.35.3).
    """
    target = SR_CLASS_UIDS[sr_class]
    result = copy.deepcopy(sr)
    if str(sr.SOPClassUID) == target:
        return result
    content = list(sr.ContentSequence)
    if sr_class != "comprehensive3d" and _has_item(content, "ValueType", "SCOORD3D"):
        raise ValueError(f"SR {sr.SOPInstanceUID} holds SCOORD3D content: cannot be encoded as {sr_class} SR")
    if sr_class == "enhanced" and _has_item(content, "ReferencedContentItemIdentifier"):
        raise ValueError(f"SR {sr.SOPInstanceUID} holds by-reference relationships: cannot be encoded as Enhanced SR")
    new_uid = uids.derive(str(sr.SOPInstanceUID), f"sr-class:{target}")
    result.SOPClassUID = UID(target)
    result.SOPInstanceUID = UID(new_uid)
    meta = FileMetaDataset(copy.deepcopy(getattr(sr, "file_meta", FileMetaDataset())))
    meta.MediaStorageSOPClassUID = UID(target)
    meta.MediaStorageSOPInstanceUID = UID(new_uid)
    result.file_meta = meta
    logger.info("re-encoded SR %s as %s SR %s", sr.SOPInstanceUID, sr_class, new_uid)
    return result

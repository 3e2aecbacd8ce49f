"""Coded concepts used in the node's result objects: standard codes first, one private scheme.

Where DICOM (DCM), SNOMED CT (SCT), LOINC (LN) or UCUM has a concept it is used. The few
concepts no standard has (the first-pass effect itself, its score, the demonstration flag...)
come from ONE private coding scheme, :data:`PRIVATE_SCHEME` (designator ``99FPENODE``), defined
here once and declared in every dataset that uses it through the Coding Scheme Identification
Sequence (PS3.3 section C.12.1.1.2; private designators begin with ``99``, PS3.16 section 8.2).
The table in ``docs/reports.md`` is generated from :data:`PRIVATE_CODES`.
"""

from __future__ import annotations

from dataclasses import dataclass

from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

__all__ = [
    "PRIVATE_SCHEME",
    "PRIVATE_CODES",
    "Fpe",
    "Std",
    "procedure_reported",
    "coding_scheme_identification",
]


@dataclass(frozen=True)
class CodingScheme:
    """A coding scheme as declared in Coding Scheme Identification Sequence (PS3.3 C.12.1.1.2)."""

    designator: str
    name: str
    responsible_organization: str
    version: str
    uid: str | None = None


PRIVATE_SCHEME = CodingScheme(
    designator="99FPENODE",
    name="fpe-node private codes",
    responsible_organization="fpe-node project (research software)",
    version="1",
)

# Standard schemes used in the objects, with their registered UIDs (PS3.16 section 8).
STANDARD_SCHEMES = (
    CodingScheme("DCM", "DICOM Controlled Terminology", "NEMA", "01", "1.2.840.10008.2.16.4"),
    CodingScheme("SCT", "SNOMED CT", "SNOMED International", "", "2.16.840.1.113883.6.96"),
    CodingScheme("LN", "LOINC", "Regenstrief Institute", "", "2.16.840.1.113883.6.1"),
    CodingScheme("UCUM", "Unified Code for Units of Measure", "Regenstrief Institute", "", "2.16.840.1.113883.6.8"),
    CodingScheme("UMLS", "Unified Medical Language System", "US National Library of Medicine", "", "2.16.840.1.113883.6.86"),
)


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME.designator, meaning=meaning)


class Fpe:
    """The private concepts of scheme ``99FPENODE``: each defined once, here."""

    FIRST_PASS_EFFECT = _private("FPE001", "First pass effect")
    PROBABILITY = _private("FPE002", "Probability of first pass effect")
    SCORE = _private("FPE003", "First pass effect score (uncalibrated)")
    LIKELY = _private("FPE004", "First pass effect likely")
    UNLIKELY = _private("FPE005", "First pass effect unlikely")
    NOT_ANALYSED = _private("FPE006", "Not analysed")
    REASON_NOT_ANALYSED = _private("FPE007", "Reason not analysed")
    INTENDED_USE = _private("FPE008", "Intended use")
    DEMONSTRATION_WEIGHTS = _private("FPE009", "Demonstration weights")
    DECISION_THRESHOLD = _private("FPE010", "Decision threshold")
    PROCESSING_NOTE = _private("FPE011", "Processing note")
    ATTENTION_MAP = _private("FPE012", "Attention map secondary capture")
    RESULT_SUMMARY = _private("FPE013", "First pass effect result summary")
    # The overlay objects (reports.seg): the segment's property category and type (CID 7150 and
    # 7151 are extensible; no standard code names "where a model looked").
    MODEL_ATTENTION = _private("FPE020", "Model attention")
    HIGH_ATTENTION_REGION = _private("FPE021", "Region of high model attention")


PRIVATE_CODES: tuple[CodedConcept, ...] = tuple(
    value for name, value in vars(Fpe).items() if isinstance(value, CodedConcept) and not name.startswith("_")
)


def _std(value: str, scheme: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


class Std:
    """Standard concepts used by the reports (PS3.16 and the external terminologies)."""

    # CID 100 "Quantitative Diagnostic Imaging Procedure": its CT and MR members.
    CT_PROCEDURE = _std("25045-6", "LN", "CT unspecified body region")
    MR_PROCEDURE = _std("25056-3", "LN", "MRI unspecified body region")
    IMAGING_MEASUREMENT_REPORT = _std("126000", "DCM", "Imaging Measurement Report")
    IMAGING_MEASUREMENTS = _std("126010", "DCM", "Imaging Measurements")
    DERIVED_IMAGING_MEASUREMENTS = _std("126011", "DCM", "Derived Imaging Measurements")
    QUALITATIVE_EVALUATIONS = _std("C0034375", "UMLS", "Qualitative Evaluations")
    PROCEDURE_REPORTED = _std("121058", "DCM", "Procedure reported")
    FINDING = _std("121071", "DCM", "Finding")
    PROCESSING_ALGORITHM = _std("109103", "DCM", "Processing Algorithm")
    BRAIN = _std("12738006", "SCT", "Brain")
    YES = _std("373066001", "SCT", "Yes")
    NO = _std("373067005", "SCT", "No")
    PERCENT = _std("%", "UCUM", "percent")
    SCORE_UNIT = _std("{score}", "UCUM", "score")
    RATIO_UNIT = _std("{ratio}", "UCUM", "ratio")
    # PS3.16 CID 7010 "Key Object Selection Document Title" is not used: the PDF uses this LOINC title.
    DIAGNOSTIC_IMAGING_REPORT = _std("18748-4", "LN", "Diagnostic imaging study")


def procedure_reported(pipeline: str | None) -> CodedConcept:
    """The imaging procedure a TID 1500 report is about (PS3.16 TID 1500 row 4, CID 100).

    The procedure is the imaging study the algorithm read (a CT or an MR of the head), not
    the algorithm. CID 100 has no head-specific CT or MR member, so its "unspecified body
    region" members are used; the body part is carried by the finding site (SCT Brain).
    """
    if pipeline == "MR":
        return Std.MR_PROCEDURE
    return Std.CT_PROCEDURE


def _scheme_item(scheme: CodingScheme) -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = scheme.designator
    if scheme.uid:
        item.CodingSchemeUID = scheme.uid
    item.CodingSchemeName = scheme.name
    if scheme.version:
        item.CodingSchemeVersion = scheme.version
    item.CodingSchemeResponsibleOrganization = scheme.responsible_organization
    return item


def coding_scheme_identification() -> DicomSequence:
    """Coding Scheme Identification Sequence (0008,0110) declaring the private scheme.

    PS3.3 section C.12.1.1.2: required when a private or non-registered designator is
    used; the standard schemes are listed too, with their UIDs, so that a reader can map
    every designator in the object.
    """
    return DicomSequence([_scheme_item(PRIVATE_SCHEME), *(_scheme_item(s) for s in STANDARD_SCHEMES)])

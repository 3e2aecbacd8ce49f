"""Patient and study attributes of the result objects, read tolerantly from a source header.

Tolerant reader, strict writer. Every result object (SR, secondary capture, PDF) copies the
Patient (PS3.3 C.7.1.1), General Study (C.7.2.1), Patient Study (C.7.2.2) and Clinical Trial
(C.7.1.3, C.7.2.3) modules from one source image. The source may lack any attribute the node
does not need itself: de-identified data and some vendors omit type 2 attributes
(PatientBirthDate, ReferringPhysicianName, StudyID, ...), and some write values their VR
forbids. :func:`source_header` turns such a header into one every builder can use:

* the type 1 UIDs the node must write (Study, Series, SOP Class and SOP Instance UID) come
  from the source; a header without them is refused with a :class:`ValueError` naming the
  attribute (the node never accepts such an instance, PS3.3 C.12.1);
* every type 2 attribute of those modules is present, empty when the source lacks it or
  its value cannot be written (PS3.5 section 7.4: type 2 "shall be present ... may be
  zero length");
* a Patient Name with several values keeps its first (VM 1, PS3.3 C.7.1.1), a date or time
  that does not parse is written empty, a Patient Sex other than M, F or O is written empty
  (PS3.3 C.7.1.1 defined terms);
* a Specific Character Set that names an unknown term is dropped; values are held decoded,
  so :func:`reports.sr.declare_character_set` then declares UTF-8 if any is non-ASCII;
* an element pydicom cannot decode at all is left out (a type 2 one is then written empty).

highdicom reads these attributes with attribute access (``evidence[0].PatientBirthDate``)
and copies modules by the source's SOP class; the builders hand it the normalised header and
copy patient and study with :func:`copy_patient_and_study`, which needs no SOP class table.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import cast

from highdicom._standard_utils import get_module_attribute_map
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, DT, TM

__all__ = [
    "PATIENT_STUDY_MODULES",
    "REQUIRED_UIDS",
    "TYPE2_ATTRIBUTES",
    "TolerantPatientCopy",
    "copy_patient_and_study",
    "patient_study_keywords",
    "required_uid",
    "source_header",
]

logger = logging.getLogger(__name__)

PATIENT_STUDY_MODULES = ("patient", "general-study", "patient-study", "clinical-trial-subject", "clinical-trial-study")
"""The modules of the Patient and Study information entities a result object copies (PS3.3 A.1.2)."""

REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")
"""Type 1 attributes of the source the result objects need (their study, their references)."""

TYPE2_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
"""Type 2 attributes of the Patient and General Study modules: always written, empty when unknown."""

_PATIENT_SEX = frozenset({"M", "F", "O"})
_PARSERS = {"DA": DA, "TM": TM, "DT": DT}
_PIXEL_GROUP = 0x7FE0


def patient_study_keywords() -> tuple[str, ...]:
    """Keywords of the root attributes of :data:`PATIENT_STUDY_MODULES` (the standard's table, via highdicom)."""
    table = get_module_attribute_map()
    keywords: dict[str, None] = {}
    for module in PATIENT_STUDY_MODULES:
        for item in table[module]:
            if not item["path"]:
                keywords[str(item["keyword"])] = None
    return tuple(keywords)


_KEYWORDS = patient_study_keywords()


def required_uid(dataset: Dataset, keyword: str) -> str:
    """A type 1 UID of ``dataset`` as a string.

    Raises
    ------
    ValueError
        When the attribute is missing or empty (naming the attribute, not the patient).
    """
    value = dataset.get(keyword)
    if value is None or str(value).strip() == "":
        raise ValueError(f"source header lacks {keyword} (type 1): no result object can refer to it")
    return str(value)


def _writable(element: DataElement) -> DataElement:
    """``element``, or a copy holding a value its VR allows (empty when none can be kept)."""
    value = element.value
    if value is None or value == "":
        return element
    if element.VR == "PN" and isinstance(value, MultiValue):
        return DataElement(element.tag, "PN", value[0] if len(value) else "")
    parser = _PARSERS.get(element.VR)
    if parser is not None and not isinstance(value, MultiValue):
        try:
            parser(value)
        except (ValueError, TypeError, OverflowError):
            logger.debug("source %s is not a valid %s: written empty", element.keyword, element.VR)
            return DataElement(element.tag, element.VR, None)
    if element.keyword == "PatientSex" and value not in _PATIENT_SEX:
        sex = str(value).strip().upper()
        return DataElement(element.tag, "CS", sex if sex in _PATIENT_SEX else None)
    return element


def _known_character_set(value: object) -> bool:
    terms = list(value) if isinstance(value, (list, MultiValue)) else [value]
    return all(term in python_encoding or (term in ("", None) and index == 0) for index, term in enumerate(terms))


def source_header(dataset: Dataset) -> Dataset:
    """A header every builder can copy patient and study from (see the module's description).

    Parameters
    ----------
    dataset:
        A source image's header (pixel data, if any, is left out of the copy).

    Returns
    -------
    pydicom.dataset.Dataset
        A new dataset: the source's elements (shared, never modified) with the type 2
        patient and study attributes present and every patient and study value writable.

    Raises
    ------
    ValueError
        When the source lacks one of :data:`REQUIRED_UIDS`.
    """
    for keyword in REQUIRED_UIDS:
        required_uid(dataset, keyword)
    header = Dataset()
    for tag in list(dataset.keys()):
        if tag.group == _PIXEL_GROUP:
            continue
        try:
            element = dataset[tag]
        except Exception as exc:  # noqa: BLE001 - a value pydicom cannot decode is left out (type 2: empty)
            logger.debug("source element %s not decodable (%s): left out of the results", tag, type(exc).__name__)
            continue
        header.add(_writable(element) if element.keyword in _KEYWORDS else element)
    for keyword in TYPE2_ATTRIBUTES:
        if keyword not in header:
            header.add_new(keyword, dictionary_VR(keyword), None)
    charset = header.get("SpecificCharacterSet")
    if charset is not None and not _known_character_set(charset):
        logger.debug("source Specific Character Set is not a defined term: dropped (values are held decoded)")
        del header.SpecificCharacterSet
    return header


def copy_patient_and_study(target: Dataset, header: Dataset, keywords: Iterable[str] = _KEYWORDS) -> None:
    """Copy the patient and study attributes present in ``header`` (from :func:`source_header`) to ``target``."""
    for keyword in keywords:
        if keyword in header:
            target.add(copy.deepcopy(header[keyword]))


class TolerantPatientCopy:
    """Mixin for highdicom's SOP classes: they copy patient and study by the source's SOP class
    (its IOD table); this copies them from the normalised header (:func:`copy_patient_and_study`),
    whatever the source's class."""

    def copy_patient_and_study_information(self, dataset: Dataset) -> None:
        copy_patient_and_study(cast(Dataset, self), dataset)

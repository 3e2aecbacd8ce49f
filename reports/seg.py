"""The high-attention region as a DICOM Segmentation over the primary series (PS3.3 A.51).

For sites whose viewer draws Segmentations but not Parametric Maps. One binary segment,
"Attention above the decision-relevant level": the source pixels whose relative attention
(:attr:`inference.result.Prediction.source_attention`, 1 = the case's maximum, 0 outside the
brain) is at least :data:`DECISION_LEVEL` = 0.5, the same level that outlines the hot region in
the SR (:data:`inference.predictor.PEAK_FRACTION`). It is relative to the case: a region the model
weighted at least half as much as its strongest spot, not a lesion and not a probability.

One frame per source plane with that plane's geometry (as :mod:`reports.pmap`), empty frames
kept so frame *k* is always source plane *k*; BINARY, 1 bit per pixel (a 512 x 512 slice is
32 KiB).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from inference.result import Prediction
from reports.codes import Fpe
from reports.header import TolerantPatientCopy
from reports.pmap import finish, overlay_geometry
from reports.sr import MANUFACTURER, ReportContext, contributing_equipment
from reports.uids import UIDFactory

__all__ = ["SEGMENTATION_STORAGE", "DECISION_LEVEL", "SEGMENT_LABEL", "DEFAULT_SEG_SERIES_NUMBER", "build_segmentation"]

logger = logging.getLogger(__name__)

SEGMENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.66.4")
DECISION_LEVEL = 0.5
SEGMENT_LABEL = "Attention >= 50% of case maximum"
DEFAULT_SEG_SERIES_NUMBER = 9905


class _Segmentation(TolerantPatientCopy, hd.seg.Segmentation):
    """highdicom's Segmentation with the tolerant patient and study copy."""


def _segment(prediction: Prediction) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=Fpe.MODEL_ATTENTION,
        segmented_property_type=Fpe.HIGH_ATTENTION_REGION,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=prediction.model.name,
            family=hd.sr.CodedConcept("123109", "DCM", "Artificial Intelligence"),
            version=prediction.model.version,
        ),
        anatomic_regions=[hd.sr.CodedConcept("12738006", "SCT", "Brain")],
    )


def build_segmentation(
    prediction: Prediction,
    sources: Sequence[Dataset],
    uids: UIDFactory,
    context: ReportContext,
    *,
    series_number: int = DEFAULT_SEG_SERIES_NUMBER,
) -> Dataset:
    """The Segmentation of a prediction's high-attention region on its primary series.

    Raises
    ------
    ValueError
        As :func:`reports.pmap.overlay_geometry`.
    """
    geometry = overlay_geometry(prediction, sources)
    assert prediction.source_attention is not None
    mask = (prediction.source_attention >= DECISION_LEVEL).astype(np.uint8)
    seg = _Segmentation(
        source_images=geometry.source_images,
        further_source_images=geometry.further_source_images or None,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment(prediction)],
        series_instance_uid=uids.new(),
        series_number=series_number,
        sop_instance_uid=uids.new(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=prediction.model.name,
        software_versions=context.software_version,
        device_serial_number=context.device_uid[-64:],
        content_description="Attention >= half the case maximum (relative, research use)",
        content_label="ATTENTION",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        pixel_measures=geometry.pixel_measures,
        plane_orientation=geometry.plane_orientation,
        plane_positions=geometry.plane_positions,
        omit_empty_frames=False,
        contributing_equipment=[contributing_equipment(
            context, prediction.model, "Attention segmentation of a first-pass-effect prediction (research use)")],
    )
    finish(seg, prediction, context, "FPE attention region")
    logger.info("built segmentation %s (%d frames) for study %s", seg.SOPInstanceUID, len(prediction.source_planes),
                seg.StudyInstanceUID)
    return seg

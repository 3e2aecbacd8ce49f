"""Validation of the node's result objects with tools nobody here wrote, plus synthetic inputs.

* :func:`dciodvfy_errors` runs dicom3tools ``dciodvfy`` (IOD and attribute checks): an object
  is valid when no output line starts with ``Error``.
* :func:`pixelmed_sr_errors` runs PixelMed's ``com.pixelmed.validate.DicomSRValidator`` (SR
  templates such as TID 1500, context groups): it prints ``Error:`` / ``Warning:`` lines and a
  final "IOD validation complete" / "Template validation complete"; ``Error`` lines fail.
* :func:`dsrdump` renders an SR with DCMTK ``/usr/bin/dsrdump`` and returns the text.
* :func:`read_strict` reads a file back with pydicom's reading validation set to RAISE.

A PixelMed run costs about 10 s of CPU (its XSLT stylesheets are large; tens of seconds of wall
time on a loaded 2-core machine), so the tests validate one object per kind, two JVMs at a time.

The second half builds synthetic :class:`inference.result.Prediction` objects on source images
from ``tests/factory.py`` (a Gaussian blob of attention, a square outline around its peak), for
the report tests.
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset

from inference.result import AttentionPeak, AttentionSlice, ModelInfo, Prediction, SourceInstance

DCIODVFY = "/usr/bin/dciodvfy"
DSRDUMP = "/usr/bin/dsrdump"
JAVA = "/usr/bin/java"
PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
# The jar's manifest Class-Path names its dependencies (vecmath, commons-codec, ...) itself.
PIXELMED_CLASSPATH = f"{PIXELMED_JAR}:/usr/share/java/commons-codec.jar:/usr/share/java/vecmath.jar"
# Java 17's XPath limits stop PixelMed's large stylesheets; C1-only JIT and the serial GC halve
# the CPU a short-lived validator JVM needs on a small machine.
_JAVA_OPTIONS = (
    "-XX:TieredStopAtLevel=1",
    "-XX:+UseSerialGC",
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
)
TIMEOUT_S = 120


def dciodvfy_errors(path: Path) -> list[str]:
    """``dciodvfy`` output lines that report an error (empty list: the object is valid)."""
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    output = proc.stdout + proc.stderr
    return [line for line in output.splitlines() if line.startswith("Error")]


def dciodvfy_output(path: Path) -> str:
    """The full ``dciodvfy`` output (warnings included), for failure messages."""
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    return proc.stdout + proc.stderr


def pixelmed_sr_output(path: Path) -> str:
    """Everything PixelMed's DicomSRValidator prints for ``path``."""
    command = [JAVA, *_JAVA_OPTIONS, "-cp", PIXELMED_CLASSPATH, "com.pixelmed.validate.DicomSRValidator", str(path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    output = proc.stdout + proc.stderr
    if "complete" not in output.lower():
        raise RuntimeError(f"DicomSRValidator did not run to completion (exit {proc.returncode}):\n{output}")
    return output


def _pixelmed_error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.match(r"\s*(Internal )?Error", line)]


def pixelmed_sr_errors(path: Path) -> list[str]:
    """PixelMed DicomSRValidator lines that report an error (empty list: valid)."""
    return _pixelmed_error_lines(pixelmed_sr_output(path))


def pixelmed_sr_outputs(paths: Sequence[Path]) -> dict[Path, str]:
    """Run DicomSRValidator on several files, two JVMs at a time (it takes one file per run)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(paths, pool.map(pixelmed_sr_output, paths)))


def pixelmed_errors_in(output: str) -> list[str]:
    """The error lines of a DicomSRValidator output."""
    return _pixelmed_error_lines(output)


def dsrdump(path: Path) -> str:
    """DCMTK's rendering of an SR (raises when dsrdump cannot read it)."""
    proc = subprocess.run([DSRDUMP, "+Pl", str(path)], capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"dsrdump failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


@contextmanager
def strict_reading() -> Iterator[None]:
    """pydicom reading validation set to RAISE for the duration."""
    settings = pydicom_config.settings
    previous = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom_config.RAISE
    try:
        yield
    finally:
        settings.reading_validation_mode = previous


def read_strict(path: Path) -> Dataset:
    """Read ``path`` with pydicom strict validation, every element decoded."""
    with strict_reading():
        ds = pydicom.dcmread(path)
        for _ in ds.iterall():
            pass
    return ds


# --------------------------------------------------------------------------- synthetic inputs


def model_info(*, calibrated: bool = True, demonstration: bool = False, threshold: float = 0.5) -> ModelInfo:
    """A model card as the predictor would report it."""
    return ModelInfo(
        name="res25",
        version="1.2.0",
        variant="nonlocal",
        weights_sha256="ab" * 32,
        calibrated=calibrated,
        threshold=threshold,
        demonstration=demonstration,
    )


def source_instance(ds: Dataset) -> SourceInstance:
    """The SourceInstance naming a dataset."""
    return SourceInstance(
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
    )


def sorted_by_position(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Source images ordered along the slice normal (the factory shuffles file order)."""
    return sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))


@dataclass(frozen=True)
class _Plane:
    """One 2-D source image: a single-frame instance or one frame of an enhanced instance."""

    source: SourceInstance
    image: np.ndarray
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    spacing: tuple[float, float]


def _floats(values: Sequence[object], count: int) -> tuple[float, ...]:
    result = tuple(float(v) for v in values)  # type: ignore[arg-type]
    assert len(result) == count
    return result


def _planes(datasets: Sequence[Dataset]) -> list[_Plane]:
    """Every 2-D image of the datasets in modality units, enhanced multi-frame files included."""
    planes = []
    for ds in datasets:
        pixels = ds.pixel_array.astype(np.float32)
        if "PerFrameFunctionalGroupsSequence" not in ds:
            image = pixels * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
            planes.append(
                _Plane(
                    source_instance(ds),
                    image,
                    _floats(ds.ImagePositionPatient, 3),  # type: ignore[arg-type]
                    _floats(ds.ImageOrientationPatient, 6),  # type: ignore[arg-type]
                    _floats(ds.PixelSpacing, 2),  # type: ignore[arg-type]
                )
            )
            continue
        shared = ds.SharedFunctionalGroupsSequence[0]
        frames = pixels if pixels.ndim == 3 else pixels[None]
        for number, (frame, group) in enumerate(zip(frames, ds.PerFrameFunctionalGroupsSequence), start=1):
            orientation = (group.get("PlaneOrientationSequence") or shared.PlaneOrientationSequence)[0]
            measures = (group.get("PixelMeasuresSequence") or shared.PixelMeasuresSequence)[0]
            source = dataclasses.replace(source_instance(ds), frame=number)
            planes.append(
                _Plane(
                    source,
                    frame,
                    _floats(group.PlanePositionSequence[0].ImagePositionPatient, 3),  # type: ignore[arg-type]
                    _floats(orientation.ImageOrientationPatient, 6),  # type: ignore[arg-type]
                    _floats(measures.PixelSpacing, 2),  # type: ignore[arg-type]
                )
            )
    return planes


def _sources(planes: Sequence[_Plane]) -> tuple[SourceInstance, ...]:
    """Every source instance once (frames of one enhanced instance are one instance)."""
    seen: dict[str, SourceInstance] = {}
    for plane in planes:
        seen.setdefault(plane.source.sop_instance_uid, dataclasses.replace(plane.source, frame=None))
    return tuple(seen.values())


def _blob(shape: tuple[int, int], centre: tuple[float, float], sigma: float, amplitude: float) -> np.ndarray:
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    return amplitude * np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * sigma**2))


def fake_prediction(
    datasets: Sequence[Dataset],
    *,
    score: float = 0.73,
    model: ModelInfo | None = None,
    n_slices: int = 25,
    pipeline: str = "CT",
    primary_role: str = "ncct",
) -> Prediction:
    """A Prediction whose attention peaks on one known source image.

    The attention is a Gaussian blob (right of centre, in the upper half) whose amplitude
    peaks at model slice ``n_slices // 2``; the peak outline is a closed square around it.
    """
    model = model or model_info()
    planes = sorted(_planes(datasets), key=lambda plane: plane.position[2])
    peak_slice = n_slices // 2
    slices = []
    for index in range(n_slices):
        plane = planes[min(len(planes) - 1, round(index * (len(planes) - 1) / max(1, n_slices - 1)))]
        rows, cols = plane.image.shape
        amplitude = math.exp(-((index - peak_slice) ** 2) / 18.0)
        heat = _blob((rows, cols), (rows * 0.4, cols * 0.6), rows / 8, amplitude)
        slices.append(
            AttentionSlice(
                model_slice=index,
                source=plane.source,
                image=plane.image,
                heat=heat.astype(np.float32),
                position_patient=plane.position,
                orientation_patient=plane.orientation,
                pixel_spacing=plane.spacing,
                slice_weight=1.0 / n_slices,
            )
        )
    top = slices[peak_slice]
    rows, cols = top.image.shape
    centre_row, centre_col = rows * 0.4, cols * 0.6
    half = rows / 8
    outline = (
        (centre_col - half, centre_row - half),
        (centre_col + half, centre_row - half),
        (centre_col + half, centre_row + half),
        (centre_col - half, centre_row + half),
        (centre_col - half, centre_row - half),
    )
    peak = AttentionPeak(
        model_slice=peak_slice,
        source=top.source,
        row=centre_row,
        column=centre_col,
        outline=outline,
        region=f"left hemisphere, slice {peak_slice + 1} of {n_slices}",
    )
    return Prediction(
        pipeline=pipeline,  # type: ignore[arg-type]
        score=score,
        positive=score >= model.threshold,
        model=model,
        primary_role=primary_role,  # type: ignore[arg-type]
        series_used={primary_role: planes[0].source.series_uid},
        sources=_sources(planes),
        attention=tuple(slices),
        peak=peak,
        slice_weights=tuple(s.slice_weight for s in slices),
    )

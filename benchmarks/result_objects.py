"""Sizes of the result objects the node builds for one real MR (the closing notes' table).

Usage (from the repository root, with ``../shared/data`` beside it)::

    .venv/bin/python benchmarks/result_objects.py [SERIES_FOLDER [DIFFUSION_SUBFOLDER]]

Default: ``mr_siemens_xa30i_classic`` with its trace-weighted DWI ``13001_TRACEW``. The study is
copied to a temporary folder and given a FLAIR (``tests.factory.write_flair_for``), analysed with
the demonstration weights on the CPU, and each result object is encoded as the node sends it
(``dicom_node.delivery.dataset_bytes``). Prints the count, pixel size and bytes of each kind.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pydicom
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.factory (the one synthetic-study factory) and the test recipe

from dicom_node.delivery import dataset_bytes
from inference.case import predict_paths
from inference.predictor import Predictor
from reports.pmap import build_parametric_map
from reports.sc import build_secondary_captures, build_summary_capture
from reports.seg import build_segmentation
from reports.sr import ReportContext, build_sr
from reports.uids import UIDFactory
from tests.factory import write_flair_for
from tests.test_predictor import recipe_selector  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def main(argv: list[str]) -> int:
    name = argv[0] if argv else "mr_siemens_xa30i_classic"
    diffusion = argv[1] if len(argv) > 1 else "13001_TRACEW"
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "mr"
        shutil.copytree(SHARED / name, study)
        write_flair_for(study, sorted((study / diffusion).iterdir()))
        prediction = predict_paths([study], Predictor.load(None, device="cpu"), recipe_selector())
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in study.rglob("*") if p.is_file()]
    uids, context = UIDFactory(), ReportContext(software_version="bench", device_uid="1.2.3.4")
    pm = build_parametric_map(prediction, headers, uids, context)
    seg = build_segmentation(prediction, headers, uids, context)
    objects = {
        "SR": [build_sr(prediction, headers, uids, context, overlays=[pm, seg])],
        "Parametric Map": [pm],
        "Segmentation": [seg],
        "slice captures": list(build_secondary_captures(prediction, headers, uids, context)),
        "summary capture": [build_summary_capture(prediction, headers, uids, context)],
    }
    print(f"{name}: {len(prediction.source_planes)} source planes, demonstration weights")
    for kind, datasets in objects.items():
        sizes = [len(dataset_bytes(ds)) for ds in datasets]
        shape = f"{datasets[0].Columns} x {datasets[0].Rows} px" if "Rows" in datasets[0] else "-"
        print(f"{kind:16s} {len(datasets):3d} object(s)  {shape:16s} {sum(sizes):>12,d} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

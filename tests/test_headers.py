"""Headers parsed once, at the door (issue 13): readiness reads the index, not the files.

The C-STORE handler's parse is kept in ``instance.header``; completion's readiness judges a
study from there. Proof: once the study is received its files are moved away, and readiness
still decides exactly as it does from the files. An index from before the column existed
(``header`` NULL) is back-filled from the files the first time, once; a file gone by then
drops its instance with a warning, never the judgement.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, null, select, update

from dicom_node.completion import SelectionReadiness, SeriesInfo
from dicom_node.index.db import write_session
from dicom_node.index.models import Instance, Series, Study
from dicom_node.selector import build_selector
from inference.dicom_headers import header_from_json, read_instance_header
from tests.factory import write_ct_stroke_study


@pytest.fixture(scope="module")
def ct_study(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A small CT code-stroke study: localizer, dose SR, NCCT, CTA."""
    return write_ct_stroke_study(
        tmp_path_factory.mktemp("headers_ct"), rows=16, thin_slices=40, cta_slices=40, with_thick=False,
        with_reformats=False, with_mips=False, lesion=False, clot=False,
    )


def _complete_series(node: Any) -> list[SeriesInfo]:
    with node.session_factory() as session:
        rows = session.execute(
            select(Series.series_uid, Series.modality, Series.instance_count, Instance.sop_class_uid,
                   Instance.sop_instance_uid, Instance.path)
            .join(Instance, Instance.series_pk == Series.id).order_by(Instance.id)
        ).all()
    infos: dict[str, SeriesInfo] = {}
    for row in rows:
        infos.setdefault(row.series_uid, SeriesInfo(
            "", row.series_uid, row.sop_class_uid, row.sop_instance_uid, modality=row.modality,
            instance_count=row.instance_count, complete=True,
        ))
    return list(infos.values())


def _decide(node: Any, series: list[SeriesInfo]) -> tuple[dict[str, bool], bool]:
    """(could_use per series, pipeline_ready of the usable ones) from a fresh readiness (no cache)."""
    readiness = SelectionReadiness(build_selector(node.settings), node.session_factory, node.settings.storage.data_dir)
    usable = {info.series_uid: readiness.could_use(info) for info in series}
    return usable, readiness.pipeline_ready([info for info in series if usable[info.series_uid]])


def _receive(node: Any, dcmtk: Any, study: Any) -> None:
    """Send the study and wait until the node's completion queued it (its own readiness is done)."""
    result = dcmtk.storescu(node.scp.address[1], study.paths())
    assert result.returncode == 0, result.stderr
    with node.session_factory() as session:
        assert session.scalar(select(func.count(Instance.id))) == len(study.paths())
    deadline = time.monotonic() + 60
    while True:
        with node.session_factory() as session:
            state = session.scalar(select(Study.state).where(Study.study_uid == study.study_uid))
        if state == "queued":
            return
        assert time.monotonic() < deadline, f"study still {state}"
        time.sleep(0.1)


def test_readiness_decides_from_the_index_without_opening_a_file(
    node: Any, dcmtk: Any, ct_study: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _receive(node, dcmtk, ct_study)
    data_dir = node.settings.storage.data_dir
    with node.session_factory() as session:  # every row holds the header its file gives
        for sop_uid, path, stored in session.execute(select(Instance.sop_instance_uid, Instance.path, Instance.header)):
            from_file = read_instance_header(data_dir / path)
            assert header_from_json(stored, from_file.path) == from_file, sop_uid
    series = _complete_series(node)
    by_key = {ct_study.series[key].series_uid: key for key in ct_study.series}
    expected = _decide(node, series)
    assert {by_key[uid] for uid, use in expected[0].items() if use} == {"ncct_thin", "cta"}
    assert expected[1]  # NCCT + CTA: the CT pipeline can run

    # An index from before stored headers (the migration leaves older rows NULL): back-filled
    # from the files the first time, once; a file gone by then drops its instance, not the study.
    ncct_uid = ct_study.series["ncct_thin"].series_uid
    with node.session_factory() as session:
        first_ncct = session.scalar(select(Instance.path).join(Series).where(Series.series_uid == ncct_uid)
                                    .order_by(Instance.id).limit(1))
    (data_dir / first_ncct).unlink()
    with write_session(node.session_factory) as session:
        session.execute(update(Instance).values(header=null()))  # SQL NULL, as the migration leaves rows
    assert _decide(node, series) == expected
    assert any("dropped: file missing" in record.getMessage() for record in caplog.records)
    with node.session_factory() as session:
        assert session.scalar(select(func.count(Instance.id)).where(Instance.header.is_(None))) == 0

    # Every file moved away: readiness decides the same from the index alone.
    shutil.move(data_dir / "dicom", tmp_path / "moved")
    caplog.clear()
    assert _decide(node, series) == expected
    assert not [r for r in caplog.records if r.name == "inference.dicom_headers" or "stored the headers" in r.getMessage()]
    gone_uid = first_ncct.rsplit("/", 1)[1].removesuffix(".dcm")
    assert {r.getMessage() for r in caplog.records if "dropped" in r.getMessage()} == {
        f"instance {gone_uid} dropped: file missing; left out of the series' judgement"  # recorded at the back-fill
    }

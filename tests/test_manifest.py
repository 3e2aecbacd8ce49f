"""The cohort manifest: every bad row is named, before anything trains."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference.training.manifest import Case, ManifestError, load_manifest, write_manifest


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0")
    return path


@pytest.fixture()
def cohort(tmp_path: Path) -> Path:
    for case in ("a", "b", "c", "d"):
        for role in ("dwi", "adc", "flair"):
            _touch(tmp_path / "nifti" / case / f"{role}.nii.gz")
    (tmp_path / "dicom" / "s1").mkdir(parents=True)
    return tmp_path


def _write(folder: Path, text: str) -> Path:
    path = folder / "cohort.csv"
    path.write_text(text)
    return path


def test_good_manifest_reads_every_column(cohort: Path) -> None:
    path = _write(
        cohort,
        "ID,Label,Modality,dwi,adc,flair,fold,split\n"
        "a,1,MR,nifti/a/dwi.nii.gz,nifti/a/adc.nii.gz,nifti/a/flair.nii.gz,2,\n"
        "b,0,mr,nifti/b/dwi.nii.gz,nifti/b/adc.nii.gz,nifti/b/flair.nii.gz,,test\n"
        "\n",
    )
    cases = load_manifest(path)
    assert [c.case_id for c in cases] == ["a", "b"]
    first, second = cases
    assert (first.label, first.modality, first.input_format, first.fold, first.split) == (1, "MR", "nifti", 2, "train")
    assert first.series["dwi"] == cohort / "nifti" / "a" / "dwi.nii.gz"
    assert (second.label, second.fold, second.split, second.line) == (0, None, "test", 3)


def test_every_bad_row_is_named_in_one_error(cohort: Path) -> None:
    path = _write(
        cohort,
        "id,label,modality,study,dwi,adc,flair,ncct\n"
        "a,1,MR,,nifti/a/dwi.nii.gz,nifti/a/adc.nii.gz,nifti/a/flair.nii.gz,\n"  # good
        "b,2,MR,,nifti/b/dwi.nii.gz,nifti/b/adc.nii.gz,nifti/b/flair.nii.gz,\n"  # label
        "c,1,MR,,nifti/c/dwi.nii.gz,nifti/c/missing.nii.gz,nifti/c/flair.nii.gz,\n"  # missing file
        "a,0,MR,,nifti/d/dwi.nii.gz,nifti/d/adc.nii.gz,nifti/d/flair.nii.gz,\n"  # duplicate id
        "e,1,PET,dicom/s1,,,,\n"  # modality
        "f,0,MR,,nifti/d/dwi.nii.gz,,,\n"  # lacks roles
        "g,0,CT,,nifti/d/dwi.nii.gz,,,nifti/d/adc.nii.gz\n"  # foreign role
        "h,0,CT,dicom/nowhere,,,,\n"  # missing study
        ",1,CT,dicom/s1,,,,\n",  # empty id
    )
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    problems = caught.value.problems
    by_line: dict[int, str] = {}
    for problem in problems:
        by_line[problem.line] = by_line.get(problem.line, "") + problem.message + "; "
    assert 2 not in by_line
    assert "unknown label '2'" in by_line[3]
    assert "adc input" in by_line[4] and "does not exist" in by_line[4]
    assert "duplicate id (first used on line 2)" in by_line[5]
    assert "unknown modality 'PET'" in by_line[6]
    assert "lacks required role(s) adc, flair" in by_line[7]
    assert "dwi do not belong to modality CT" in by_line[8]
    assert "CT case lacks required role(s) cta" in by_line[8]  # the default recipe needs a CTA
    assert "study folder" in by_line[9] and "does not exist" in by_line[9]
    assert "empty id" in by_line[10]
    message = str(caught.value)
    assert len(problems) == 9 and "9 problem(s)" in message
    assert all(f"line {n}" in message for n in range(3, 11))


def test_case_checker_runs_on_otherwise_valid_rows(cohort: Path) -> None:
    path = _write(cohort, "id,label,modality,study\nx,1,CT,dicom/s1\ny,0,CT,dicom/s1\n")
    seen: list[str] = []

    def checker(case: Case) -> str | None:
        seen.append(case.case_id)
        return "selection cannot complete the CT pipeline: no NCCT series" if case.case_id == "y" else None

    with pytest.raises(ManifestError, match=r"line 3 \(id 'y'\): selection cannot complete"):
        load_manifest(path, check_case=checker)
    assert seen == ["x", "y"]


def test_header_errors_stop_at_once(cohort: Path) -> None:
    with pytest.raises(ManifestError, match=r"(?s)header lacks column\(s\) label.*unknown column\(s\) outcome"):
        load_manifest(_write(cohort, "id,outcome,modality\na,1,MR\n"))
    with pytest.raises(ManifestError, match="file does not exist"):
        load_manifest(cohort / "nope.csv")


def test_mixed_formats_and_bad_fold_are_refused(cohort: Path) -> None:
    (cohort / "dicom" / "adc").mkdir()
    path = _write(
        cohort,
        "id,label,modality,dwi,adc,flair,fold,split\n"
        "a,1,MR,nifti/a/dwi.nii.gz,dicom/adc,nifti/a/flair.nii.gz,,\n"
        "b,1,MR,nifti/b/dwi.nii.gz,nifti/b/adc.nii.gz,nifti/b/flair.nii.gz,-1,validation\n",
    )
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    messages = [str(problem) for problem in caught.value.problems]
    assert any("line 2" in m and "mixes NIfTI files and DICOM folders" in m for m in messages)
    assert any("line 3" in m and "fold '-1'" in m for m in messages)
    assert any("line 3" in m and "unknown split 'validation'" in m for m in messages)


def test_write_then_load_round_trips(cohort: Path) -> None:
    original = load_manifest(
        _write(
            cohort,
            "id,label,modality,dwi,adc,flair,fold\n"
            "a,1,MR,nifti/a/dwi.nii.gz,nifti/a/adc.nii.gz,nifti/a/flair.nii.gz,1\n",
        )
    )
    again_path = cohort / "again.csv"
    write_manifest(again_path, original)
    again = load_manifest(again_path)
    assert [(c.case_id, c.label, c.fold, dict(c.series)) for c in again] == [
        (c.case_id, c.label, c.fold, {k: v.resolve() for k, v in c.series.items()}) for c in original
    ]


def test_selection_checker_names_what_a_dicom_study_lacks(tmp_path: Path) -> None:
    from tests import factory

    from inference.training.manifest import selection_checker

    small = {"rows": 32, "with_reformats": False, "with_mips": False, "with_dose_report": False}
    factory.write_ct_stroke_study(tmp_path / "ct", **small)
    factory.write_ct_stroke_study(tmp_path / "ct_no_cta", with_cta=False, **small)
    factory.write_mr_stroke_study(tmp_path / "mr", rows=32, with_flair=False)
    path = _write(
        tmp_path,
        "id,label,modality,study\nct1,1,CT,ct\nct2,1,CT,ct_no_cta\nmr1,0,MR,mr\nwrong,0,MR,ct\n",
    )
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, check_case=selection_checker())
    by_line = {problem.line: problem.message for problem in caught.value.problems}
    assert 2 not in by_line  # NCCT + CTA: complete under the default recipe
    assert by_line[3] == "selection cannot complete the CT pipeline: no cta series"
    assert by_line[4] == "selection cannot complete the MR pipeline: no flair series"
    assert by_line[5] == "selection cannot complete the MR pipeline: no dwi series"
    # A recipe that zero-fills the CTA channel accepts the NCCT-only study.
    relaxed = selection_checker(required_roles={"CT": ("ncct",), "MR": ("dwi", "adc", "flair")})
    with pytest.raises(ManifestError) as again:
        load_manifest(path, check_case=relaxed)
    assert {problem.line for problem in again.value.problems} == {4, 5}

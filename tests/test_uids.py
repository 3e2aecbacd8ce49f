"""New UIDs come from the site's root or are UUID-derived; never from a library's example root."""

from __future__ import annotations

import pytest

from dicom_node.settings import FORBIDDEN_UID_ROOTS, SettingsError, UIDSettings, load_settings
from dicom_node.uids import IMPLEMENTATION_CLASS_UID, is_own_uid, is_valid_uid, new_uid


def test_default_uids_are_uuid_derived() -> None:
    uids = {new_uid(UIDSettings()) for _ in range(200)}
    assert len(uids) == 200
    assert all(uid.startswith("2.25.") and is_valid_uid(uid, strict=True) for uid in uids)


def test_site_root_uids_are_valid_unique_and_recognised() -> None:
    settings = UIDSettings(root="1.2.826.0.1.999999.42")
    uids = [new_uid(settings) for _ in range(500)]
    assert len(set(uids)) == 500
    assert all(is_valid_uid(uid, strict=True) and len(uid) <= 64 for uid in uids)
    assert all(is_own_uid(uid, settings) for uid in uids)
    assert not is_own_uid("2.25.1", settings)


def test_long_root_still_fits_64_characters() -> None:
    settings = UIDSettings(root="1." + "2" * 38)
    assert len(settings.root or "") == 40
    assert all(len(new_uid(settings)) <= 64 for _ in range(50))


@pytest.mark.parametrize("root", FORBIDDEN_UID_ROOTS)
def test_library_example_roots_are_refused(root: str) -> None:
    with pytest.raises(SettingsError, match="uid.root"):
        load_settings(environ={"FPENODE_UID__ROOT": root + ".5"})


def test_received_uid_checks_are_tolerant_but_safe_as_file_names() -> None:
    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.2")
    assert is_valid_uid("1.2.03.4")  # leading zero: tolerated on input
    assert not is_valid_uid("1.2.03.4", strict=True)
    for bad in ("", "1.2.3/../x", "1..2", ".1.2", "1.2.", "1" * 65, None):
        assert not is_valid_uid(bad)
    assert is_valid_uid(IMPLEMENTATION_CLASS_UID, strict=True)

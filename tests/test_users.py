"""Users, logins, lock-out and API tokens on a real index (dicom_node.web.auth), and the
``fpe-node users`` / ``fpe-node tokens`` commands acting through the same functions."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import select

import dicom_node.index.models  # noqa: F401 - tables on the metadata
import dicom_node.index.users  # noqa: F401
from dicom_node.cli import main
from dicom_node.index.base import Base
from dicom_node.index.db import build_engine, build_session_factory, upgrade_to_head
from dicom_node.index.models import AuditEntry
from dicom_node.index.users import WebUser
from dicom_node.web import auth
from dicom_node.web.context import WebContext
from dicom_node.web.deps import Role
from tests.conftest import SettingsFactory, settings_overrides
from tests.peers import drop_postgres_schema, fresh_postgres_schema, postgres_base_url

PASSWORD = "correct horse battery"
NEW_TABLES = {"web_user", "web_session", "api_token", "node_suspension", "audit_entry"}


@pytest.fixture
def context(make_settings: SettingsFactory) -> Iterator[WebContext]:
    settings = make_settings(console={"lockout_failures": 3, "lockout_min": 10})
    engine = build_engine(settings)
    upgrade_to_head(engine)
    yield WebContext(settings=settings, session_factory=build_session_factory(engine))
    engine.dispose()


def _tables_in(diff_item: object) -> set[str]:
    """Names of the tables a compare_metadata entry is about (table objects or table-name strings)."""
    names = set()
    for change in diff_item if isinstance(diff_item, list) else [diff_item]:
        for part in change:
            table = getattr(part, "table", None)
            name = part if isinstance(part, str) else getattr(part, "name", None) if table is None else table.name
            if isinstance(name, str):
                names.add(name)
    return names


def _audit(context: WebContext) -> list[AuditEntry]:
    with context.session_factory() as session:
        return list(session.scalars(select(AuditEntry).order_by(AuditEntry.id)))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migration_0400_matches_the_models(backend: str, tmp_path: Path) -> None:
    url = schema = base = None
    if backend == "postgresql":
        base = postgres_base_url()
        url, schema = fresh_postgres_schema(base)
    from dicom_node.settings import load_settings

    engine = build_engine(load_settings(environ={}, overrides={"storage": {"data_dir": str(tmp_path)}, "index": {"url": url}}))
    try:
        upgrade_to_head(engine)
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        ours = [item for item in diff if _tables_in(item) & NEW_TABLES]
        assert ours == []
    finally:
        engine.dispose()
        if schema is not None and base is not None:
            drop_postgres_schema(base, schema)


def test_password_is_stored_as_argon2_and_login_is_audited_with_the_source(context: WebContext) -> None:
    auth.add_user(context, "alice", "operator", PASSWORD, actor="test", source="local")
    with context.session_factory() as session:
        stored = session.scalar(select(WebUser.password_hash).where(WebUser.name == "alice"))
    assert stored is not None and stored.startswith("$argon2id$") and PASSWORD not in stored

    principal, token = auth.login(context, "alice", PASSWORD, "192.0.2.7")
    assert principal.name == "alice" and principal.role is Role.operator
    found = auth.authenticate_session(context, token)
    assert found is not None and found.principal == principal and found.csrf_token
    with pytest.raises(auth.LoginRefused):
        auth.login(context, "alice", "wrong password!", "192.0.2.8")
    auth.logout(context, token, "192.0.2.7")
    assert auth.authenticate_session(context, token) is None

    entries = [(e.action, e.actor, e.source) for e in _audit(context)]
    assert entries == [
        ("user.add", "test", "local"),
        ("user.login", "alice", "192.0.2.7"),
        ("user.login_failed", "alice", "192.0.2.8"),
        ("user.logout", "alice", "192.0.2.7"),
    ]


def test_lockout_after_repeated_failures_refuses_the_right_password(context: WebContext) -> None:
    auth.add_user(context, "bob", "viewer", PASSWORD, actor="test", source="local")
    for _ in range(3):  # console.lockout_failures
        with pytest.raises(auth.LoginRefused, match="wrong user name or password"):
            auth.login(context, "bob", "not the password", "192.0.2.1")
    with pytest.raises(auth.LoginRefused, match="locked"):
        auth.login(context, "bob", PASSWORD, "192.0.2.1")
    auth.change_user(context, "bob", unlock=True, actor="test", source="local")
    assert auth.login(context, "bob", PASSWORD, "192.0.2.1")[0].name == "bob"
    details = [json.loads(e.detail or "{}").get("reason") for e in _audit(context) if e.action == "user.login_failed"]
    assert details == ["wrong password", "wrong password", "wrong password; locked for 10 min", "account locked"]


def test_tokens_never_exceed_the_owner_and_the_last_admin_stays(context: WebContext) -> None:
    auth.add_user(context, "root", "admin", PASSWORD, actor="test", source="local")
    auth.add_user(context, "carol", "operator", PASSWORD, actor="test", source="local")
    with pytest.raises(auth.UserError, match="above"):
        auth.add_token(context, "carol", "script", "admin", actor="test", source="local")
    info, secret = auth.add_token(context, "carol", "script", actor="test", source="local")
    assert info.role is Role.operator and secret.startswith("fpe_")
    assert auth.authenticate_token(context, secret) == auth.Principal("carol", Role.operator, "token")
    auth.change_user(context, "carol", role="viewer", actor="test", source="local")
    assert auth.authenticate_token(context, secret) == auth.Principal("carol", Role.viewer, "token")
    auth.remove_token(context, info.id, actor="test", source="local")
    assert auth.authenticate_token(context, secret) is None
    with pytest.raises(auth.UserError, match="last admin"):
        auth.remove_user(context, "root", actor="test", source="local")
    with pytest.raises(auth.UserError, match="last admin"):
        auth.change_user(context, "root", role="operator", actor="test", source="local")


def test_users_cli_reads_the_password_from_stdin_never_an_argument(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump(settings_overrides(data_dir)))
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["--config", str(config), "users", "add", "admin", "--role", "admin", "--password-stdin"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["--config", str(config), "users", "add", "eve", "--role", "viewer", "--password-stdin"]) == 1
    assert "at least 10 characters" in capsys.readouterr().err
    assert main(["--config", str(config), "users", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(u["name"], u["role"]) for u in listed] == [("admin", "admin")]
    assert main(["--config", str(config), "tokens", "add", "admin", "--name", "nightly"]) == 0
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    assert secret.startswith("fpe_")
    from dicom_node.settings import load_settings

    settings = load_settings(config, environ={})
    engine = build_engine(settings)
    try:
        context = WebContext(settings=settings, session_factory=build_session_factory(engine))
        assert auth.authenticate_token(context, secret) == auth.Principal("admin", Role.admin, "token")
        assert [e.action for e in _audit(context) if e.source == "local"] == ["user.add", "token.add"]
        assert auth.login(context, "admin", PASSWORD, "127.0.0.1")[0].role is Role.admin
    finally:
        engine.dispose()


def test_sessions_end_when_idle_too_long_and_when_the_password_changes(context: WebContext) -> None:
    import datetime as dt

    from dicom_node.index.db import write_session
    from dicom_node.index.users import WebSession

    auth.add_user(context, "dave", "viewer", PASSWORD, actor="test", source="local")
    _, idle = auth.login(context, "dave", PASSWORD, "192.0.2.9")
    _, other = auth.login(context, "dave", PASSWORD, "192.0.2.9")
    with write_session(context.session_factory) as session:  # the first one unused for 31 minutes (session_idle_min 30)
        row = session.scalars(select(WebSession).order_by(WebSession.id)).first()
        assert row is not None
        row.last_seen_at = row.last_seen_at - dt.timedelta(minutes=31)
    assert auth.authenticate_session(context, idle) is None
    assert auth.authenticate_session(context, other) is not None
    auth.change_user(context, "dave", password=PASSWORD + "!", actor="test", source="local")
    assert auth.authenticate_session(context, other) is None

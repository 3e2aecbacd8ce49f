"""Shared fixtures: data directory, settings factory, free ports, the node in-process and as
an ``fpe-node serve`` subprocess, and the path of the real DICOM test data.

Real data lives in ``../shared/data`` (relative to the repository root); a test that needs it
FAILS when it is missing (``shared_data`` fixture), it never skips.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from dicom_node.settings import Settings, load_settings
from tests.archives import free_port  # noqa: F401 - one definition, re-exported for tests importing it from here
from tests.peers import dcmtk, postgres_url  # noqa: F401 - fixtures shared with every test module

if TYPE_CHECKING:
    from dicom_node.lifecycle import Lifecycle, StudyState

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CT_PHILIPS = SHARED_DATA / "ct_philips_headphantom_1mm"
MR_ENHANCED = SHARED_DATA / "mr_siemens_xa30_dwi_enh"
TS_SIEMENS = SHARED_DATA / "ts_siemens_mr_transfer_syntaxes"

# The sender registered in every test node, with the titles DCMTK and pynetdicom tools use.
TEST_PEER = {
    "name": "TESTSCU",
    "ae_titles": ["STORESCU", "ECHOSCU", "TESTSCU", "FINDSCU"],
    "host": "127.0.0.1",
    "roles": ["source"],
}
NODE_AE = "FPENODE"


def require_shared_data(*parts: str) -> Path:
    """A path under ``../shared/data``; fails the test (never skips) when it is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"shared test data missing: {path} (see ../shared/data/MANIFEST.md)")
    return path


@pytest.fixture
def shared_data() -> Path:
    """The real DICOM test data folder (fails when missing)."""
    return require_shared_data()


def wait_study_state(
    lifecycle: Lifecycle, study_uid: str, wanted: set[StudyState], timeout_s: float = 30.0, poll_s: float = 0.1
) -> StudyState:
    """Poll a study's lifecycle state until it is one of ``wanted`` (returned); fail the test with the
    state it stayed in when ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = lifecycle.state_of(study_uid)
        if state in wanted:
            return state
        time.sleep(poll_s)
    raise AssertionError(f"study {study_uid} stayed {lifecycle.state_of(study_uid)}")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An empty data directory for one test."""
    path = tmp_path / "data"
    path.mkdir()
    return path


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def settings_overrides(data_dir: Path, **sections: Any) -> dict[str, Any]:
    """Overrides for a test node: its data dir, a free port, the test peer, fast timers."""
    base: dict[str, Any] = {
        "network": {"port": free_port(), "host": "127.0.0.1"},
        "console": {"port": 0},  # any free port; ServeProcess.console_url reads it from the log
        "storage": {"data_dir": str(data_dir)},
        "peers": [TEST_PEER],
        # No inference worker processes unless a test asks for them (they load torch and a model).
        "inference": {"workers": 0},
    }
    return _merge(base, sections)


SettingsFactory = Callable[..., Settings]


class NodeLog(logging.Handler):
    """Every record of the node's loggers (``dicom_node.*``), kept as records and formatted lines.

    Attached to the ``dicom_node`` logger itself, so it sees the node's records whatever the
    in-process CLI (:func:`dicom_node.logs.configure`) did to the root handlers pytest's caplog uses.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        """All lines, one per record."""
        return "\n".join(self.lines)


@pytest.fixture
def node_log() -> Iterator[NodeLog]:
    """The node's log records during one test; the root handlers and level an in-process CLI run
    replaced are put back afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    handler = NodeLog()
    logger = logging.getLogger("dicom_node")
    previous_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        for current in list(root.handlers):
            root.removeHandler(current)
        for old in saved[0]:
            root.addHandler(old)
        root.setLevel(saved[1])


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module's tests (torch's CPU sums are bit-stable per thread count);
    use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def make_settings(data_dir: Path) -> SettingsFactory:
    """``make_settings(network={...}, index={...})``: validated settings for a test node."""

    def factory(**sections: Any) -> Settings:
        return load_settings(environ={}, overrides=settings_overrides(data_dir, **sections))

    return factory


@pytest.fixture
def node(make_settings: SettingsFactory) -> Iterator[Any]:
    """The node in-process on a free port (SQLite index), stopped after the test."""
    from dicom_node.bootstrap import build_node

    built = build_node(make_settings())
    built.start("127.0.0.1", 0)
    try:
        yield built
    finally:
        built.stop(grace_s=1.0)


_SERVING_RE = re.compile(r"serving AE \S+ on \S+ port (\d+)")
_CONSOLE_RE = re.compile(r"fpe-node console on (http://\S+/)")
_RUNNING_RE = re.compile(r"fpe-node (?:worker|sender) running")


@dataclass
class ServeProcess:
    """An ``fpe-node serve`` subprocess (stderr captured to a file)."""

    config: Path
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    args: list[str] = field(default_factory=list)
    """Arguments after ``serve`` (``--role worker``, ``--port 0``...)."""
    _log: Any = field(default=None, repr=False)
    _offset: int = field(default=0, repr=False)

    def launch(self) -> ServeProcess:
        """Start the process without waiting (:meth:`wait_started` waits)."""
        self._log = open(self.log_path, "ab")
        self._offset = self.log_path.stat().st_size
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "--config", str(self.config), "serve", *self.args],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    def start(self, timeout_s: float = 60.0) -> ServeProcess:
        """Start and wait until it listens (a role without a DICOM port: until it runs)."""
        return self.launch().wait_started(timeout_s)

    def wait_started(self, timeout_s: float = 60.0) -> ServeProcess:
        """Wait for the line that says the process serves: its DICOM port, or for a worker or
        sender role the line saying it runs."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            logged = self.log_path.read_bytes()[self._offset:].decode("utf-8", "replace")
            match = _SERVING_RE.search(logged)
            if match:
                self.port = int(match.group(1))
                return self
            if _RUNNING_RE.search(logged):
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"fpe-node serve exited early:\n{self.log_text()}")
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"fpe-node serve did not start in {timeout_s} s:\n{self.log_text()}")

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout_s)
        self._close_log()
        return code

    def kill(self) -> None:
        """SIGKILL (kill -9) and reap."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self._close_log()

    @property
    def console_url(self) -> str:
        """The console's base URL (``http://host:port/``) as the process logged it."""
        matches = _CONSOLE_RE.findall(self.log_text())
        if not matches:
            raise AssertionError(f"fpe-node serve logged no console URL:\n{self.log_text()}")
        return str(matches[-1])

    def log_text(self) -> str:
        """Everything the process logged so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


@pytest.fixture
def serve_process(tmp_path: Path, data_dir: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Factory starting ``fpe-node serve`` with a site YAML; every process is stopped afterwards.

    ``serve_process(network={...}, ...)`` merges sections over the test defaults.
    """
    started: list[ServeProcess] = []

    def factory(env: Mapping[str, str] | None = None, start: bool = True, **sections: Any) -> ServeProcess:
        config = tmp_path / f"site{len(started)}.yaml"
        config.write_text(yaml.safe_dump(settings_overrides(data_dir, **sections)))
        environ = {k: v for k, v in os.environ.items() if not k.startswith("FPENODE_")}
        environ.update(env or {})
        handle = ServeProcess(config=config, log_path=tmp_path / "serve.log", env=environ)
        started.append(handle)
        return handle.start() if start else handle

    yield factory
    for handle in started:
        if handle.process is not None and handle.process.poll() is None:
            handle.process.send_signal(signal.SIGTERM)
            try:
                handle.process.wait(30)
            except subprocess.TimeoutExpired:
                handle.kill()
        handle._close_log()


# -- the outcome of a study (corpus and property tests) ---------------------------------------

SCORE_TOLERANCE = 1e-5  # the worker process and a direct run may differ in the last float bits


@dataclass(frozen=True)
class Outcome:
    """What a run concluded for a study (the index's ``analysis`` row, or the same from a direct run)."""

    outcome: str
    reason: str | None
    pipeline: str | None
    series_used: tuple[tuple[str, str], ...]
    score: float | None
    positive: bool | None

    def same_as(self, other: "Outcome") -> bool:
        """Same conclusion: outcome, reason, pipeline, series, decision, and score within a tolerance."""
        if (self.outcome, self.reason, self.pipeline, self.series_used, self.positive) != (
            other.outcome, other.reason, other.pipeline, other.series_used, other.positive
        ):
            return False
        if self.score is None or other.score is None:
            return self.score is other.score
        return abs(self.score - other.score) <= SCORE_TOLERANCE


def outcome_from_summary(outcome: str, summary: dict[str, Any]) -> Outcome:
    """The :class:`Outcome` of an analysis row's outcome and its ``result_summary``."""
    return Outcome(
        outcome=outcome, reason=summary.get("reason"), pipeline=summary.get("pipeline"),
        series_used=tuple(sorted((summary.get("series_used") or {}).items())),
        score=summary.get("score"), positive=summary.get("positive"),
    )


def direct_outcome(paths: Sequence[Path], settings: Settings, predictor: Any, *, keep: list[Any] | None = None) -> Outcome:
    """What the worker concludes for the study held in ``paths`` (files or folders, read in this
    order), without the network: eligibility, selection, volumes and the model, as
    :meth:`dicom_node.worker.Analyst._analyse` runs them. ``keep`` receives the result object."""
    from dicom_node.lifecycle import StudyState
    from inference.case import case_from_headers
    from inference.dicom_headers import read_series_headers
    from inference.eligibility import check_study, load_eligibility_rules
    from inference.predictor import result_summary
    from inference.result import NotAnalysed, Prediction
    from inference.selection import Selector, load_selection_rules

    inference = settings.inference
    selector = Selector(
        load_selection_rules(inference.selection_rules), case_window_h=inference.case_window_h,
        prefer_pipeline=inference.prefer_pipeline,
        required_roles={p: predictor.recipe.for_pipeline(p).required_roles for p in ("CT", "MR")},
    )
    datasets: dict[Path, Any] = {}
    headers = read_series_headers(list(paths), datasets)
    decision = check_study(headers, load_eligibility_rules(inference.eligibility_rules), now=dt.datetime.now())
    if not decision.eligible:
        refused = NotAnalysed(decision.reason)
        if keep is not None:
            keep.append(refused)
        return outcome_from_summary(StudyState.NOT_ELIGIBLE.value, result_summary(refused))
    try:  # as the worker does (dicom_node.worker.Analyst.run_job): a crash is a reason too
        case = case_from_headers(headers, selector, datasets=datasets)
        result = case if isinstance(case, NotAnalysed) else predictor.predict(case)
    except Exception as exc:  # noqa: BLE001
        result = NotAnalysed(f"internal error during analysis ({type(exc).__name__}); see the node's log")
    if keep is not None:
        keep.append(result)
    state = StudyState.ANALYSED if isinstance(result, Prediction) else StudyState.NOT_ANALYSED
    return outcome_from_summary(state.value, result_summary(result))

"""A real Prometheus scrapes a running ``fpe-node serve`` after a study went through; the example
alert rules pass ``promtool``; the Grafana dashboard and the rules use only metrics the node
exports, each described in docs/metrics.md.

Prometheus (Debian package ``prometheus``, deploy/debian-packages.sh) runs with a temporary
configuration (scrape interval 1 s), storage folder and free port; the test asks its HTTP API
(``/api/v1/query``) for the node's counters. The node analyses the study with the reduced
checkpoint of :func:`tests.training_support.reduced_checkpoint` in one worker process and sends
its results to a DCMTK storescp.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.archives import StorescpArchive, free_port
from tests.conftest import REPO_ROOT, TEST_PEER, ServeProcess
from tests.factory import write_ct_stroke_study
from tests.peers import DCMTK
from tests.training_support import reduced_checkpoint

PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
WAIT_S = 180.0
MODEL_NAME = "res25-metrics-test"


def _require(tool: Path) -> None:
    if not tool.exists():
        pytest.fail(f"{tool} is missing: install the Debian package prometheus (deploy/debian-packages.sh)")


class Prometheus:
    """A Prometheus server scraping one target every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        _require(PROMETHEUS)
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "fpe-node", "metrics_path": "/metrics", "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.workdir / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={self.workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
        )
        log.close()
        _until(lambda: self._ready(), "Prometheus ready", 60.0)

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited: {(self.workdir / 'prometheus.log').read_text()}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expression: str) -> list[dict[str, Any]]:
        """The instant vector of ``expression`` (``/api/v1/query``)."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expression}, timeout=10)
        body = response.json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def value(self, expression: str) -> float | None:
        """The single value of ``expression``, ``None`` while it has no sample."""
        result = self.query(expression)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def _until(predicate: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    started: list[Prometheus] = []

    def factory(target: str) -> Prometheus:
        workdir = tmp_path / f"prometheus{len(started)}"
        workdir.mkdir()
        server = Prometheus(workdir, target)
        started.append(server)
        server.start()
        return server

    yield factory
    for server in started:
        server.stop()


def test_prometheus_scrapes_the_node_after_a_study_went_through(
    serve_process: Callable[..., ServeProcess], prometheus_for: Callable[[str], Prometheus], dcmtk: DCMTK, tmp_path: Path
) -> None:
    checkpoint = reduced_checkpoint(tmp_path / "model.pt", name=MODEL_NAME)
    now = dt.datetime.now() - dt.timedelta(minutes=5)
    study = write_ct_stroke_study(
        tmp_path / "study", rows=48, study_date=now.strftime("%Y%m%d"), study_time=now.strftime("%H%M%S"),
        with_dose_report=False, with_reformats=False, with_localizer=False, with_thick=False, with_mips=False,
    )
    archive = StorescpArchive(tmp_path / "archive")
    archive.start()
    destination = {"name": "ARCHIVE", "ae_titles": ["ARCHIVE"], "host": "127.0.0.1", "port": archive.port,
                   "roles": ["destination"]}
    served = serve_process(
        inference={"checkpoint": str(checkpoint), "device": "cpu", "torch_threads": 1, "workers": 1},
        completion={"series_quiet_s": 0.5, "study_timeout_s": 30.0},
        peers=[TEST_PEER, destination],
    )
    target = served.console_url.removeprefix("http://").rstrip("/")
    prometheus = prometheus_for(target)
    stored = dcmtk.storescu(served.port, study.paths())
    assert stored.returncode == 0, stored.stderr
    files = len(study.paths())

    try:
        _until(lambda: prometheus.value('fpenode_studies{state="delivered"}') == 1, "the delivered study in Prometheus")
    finally:
        archive.stop()
    assert prometheus.value('fpenode_analyses_total{outcome="analysed"}') == 1
    assert prometheus.value('up{job="fpe-node"}') == 1
    assert prometheus.value('fpenode_instances_received_total{status="success"}') == files
    assert prometheus.value("fpenode_associations_accepted_total") >= 1
    assert prometheus.value('fpenode_studies{state="analysed"}') == 0
    assert prometheus.value('fpenode_studies{state="received"}') == 0
    assert prometheus.value('fpenode_analyses_total{outcome="analysed", pipeline="CT"}') == 1
    assert prometheus.value(f'fpenode_score_count{{model_name="{MODEL_NAME}", model_version="1"}}') == 1
    assert prometheus.value(f'fpenode_score_bucket{{model_name="{MODEL_NAME}", le="+Inf"}}') == 1
    assert prometheus.value("sum(fpenode_decisions_total)") == 1
    assert prometheus.value('fpenode_analysis_stage_seconds_count{stage="infer"}') == 1
    assert prometheus.value('fpenode_analysis_stage_seconds_sum{stage="infer"}') > 0
    assert prometheus.value("sum(fpenode_completion_wait_seconds_count)") == 1
    assert prometheus.value(f'fpenode_model_info{{name="{MODEL_NAME}", demonstration="false"}}') == 1
    assert prometheus.value('fpenode_time_to_result_seconds_count{state="delivered"}') == 1
    sent = archive.received_files()
    assert prometheus.value('fpenode_outbox_items{destination="ARCHIVE", state="sent"}') == len(sent) > 0
    assert prometheus.value('fpenode_delivery_attempts_total{destination="ARCHIVE", result="sent"}') == len(sent)
    assert prometheus.value('fpenode_outbox_depth{destination="ARCHIVE"}') == 0
    assert prometheus.value('fpenode_dead_letters{destination="ARCHIVE"}') == 0
    assert prometheus.value("fpenode_workers_model_loaded") == 1
    ready = httpx.get(served.console_url + "health/ready", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["model"] == {"ok": True, "detail": "1 of 1 loaded their model"}
    text = httpx.get(served.console_url + "metrics", timeout=10).text
    assert study.patient.name not in text and study.patient.patient_id not in text
    assert served.terminate() == 0


# -- the example files in deploy/ -------------------------------------------------------------

RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "fpe-node.json"
METRICS_DOC = REPO_ROOT / "docs" / "metrics.md"
_PROMQL_WORDS = {
    "sum", "by", "without", "rate", "increase", "delta", "histogram_quantile", "offset", "and", "or", "unless",
    "avg", "max", "min", "count", "le", "on", "ignoring", "group_left", "group_right", "bool",
}


def test_example_rules_and_config_pass_promtool() -> None:
    _require(PROMTOOL)
    rules = subprocess.run([str(PROMTOOL), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = subprocess.run(
        [str(PROMTOOL), "check", "config", str(RULES.parent / "prometheus.yml")], capture_output=True, text=True, timeout=60
    )
    assert config.returncode == 0, config.stdout + config.stderr


def _exported_samples(node: Any) -> tuple[set[str], set[str]]:
    """Sample names the node can export (histogram, counter and info suffixes included) and family names."""
    from dicom_node.metrics import NodeCollector

    samples: set[str] = set()
    families: set[str] = set()
    for family in NodeCollector(node.settings, node.session_factory, node).collect():
        families.add(family.name)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",)}
        samples.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return samples, families


def _metric_names(expression: str) -> set[str]:
    """Metric names in a PromQL expression (strings, label matchers, ranges, grouping clauses removed)."""
    text = re.sub(r'"[^"]*"', '""', expression)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\boffset\s+\w+", "", text)
    text = re.sub(r"#[^\n]*", "", text)
    names = set(re.findall(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", text))
    return names - _PROMQL_WORDS


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_dashboard_and_rules_use_only_exported_metrics_each_documented(node: Any) -> None:
    samples, families = _exported_samples(node)
    expressions = _dashboard_expressions()
    rules = yaml.safe_load(RULES.read_text())
    expressions += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert len(expressions) > 20
    used = set().union(*(_metric_names(expression) for expression in expressions))
    assert used - samples - {"up"} == set(), "expressions refer to metrics the node does not export"
    assert {"fpenode_score_bucket", "fpenode_decisions_total", "fpenode_time_to_result_seconds_bucket"} <= used
    documented = METRICS_DOC.read_text()
    assert [name for name in sorted(families) if f"`{name}" not in documented] == []


# -- timeline-derived metrics ------------------------------------------------------------------


def test_timeline_metrics_count_each_transition_once(make_settings: Any) -> None:
    """Completion waits and time to result: one per arrival or re-opening; notes repeating a state
    and a re-send of the same results are not counted again; a second scrape counts nothing twice."""
    from dicom_node.bootstrap import build_node
    from dicom_node.lifecycle import StudyState
    from dicom_node.metrics import build_registry
    from dicom_node.status import Status
    from tests.peers import send_datasets, tiny_ct

    # completion's own timers far away: the test moves the study itself, as completion and the worker do
    node = build_node(make_settings(completion={"series_quiet_s": 600, "study_timeout_s": 600}))
    node.start("127.0.0.1", 0)
    try:
        registry = build_registry(node.settings, node.session_factory, node)
        ds = tiny_ct()
        assert send_datasets(node.scp.address[1], [ds]) == [Status.SUCCESS]
        uid, lifecycle = str(ds.StudyInstanceUID), node.lifecycle

        def through(*states: StudyState) -> None:
            for state in states:
                lifecycle.transition(uid, state, f"to {state.value}")

        def sample(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, labels)

        lifecycle.note(uid, "a series went quiet")  # a note in received: the cycle still starts at arrival
        assert lifecycle.enqueue(uid, "1 usable series complete")
        job = lifecycle.claim_next("test-worker")
        assert job is not None
        lifecycle.finish(uid, StudyState.ANALYSED, "score 0.5")
        through(StudyState.REPORTING, StudyState.DELIVERED)
        lifecycle.note(uid, "results re-sent on request")  # a note in delivered
        through(StudyState.REPORTING, StudyState.DELIVERED)  # a re-send
        for _scrape in range(2):
            assert sample("fpenode_completion_wait_seconds_count", trigger="ready") == 1
            assert sample("fpenode_time_to_result_seconds_count", state="delivered") == 1
            assert sample("fpenode_studies", state="delivered") == 1
            assert sample("fpenode_instances_received_total", status="success") == 1
            assert sample("fpenode_associations_accepted_total") == 1

        assert lifecycle.reopen(uid, "a usable series arrived") is not None  # a new cycle
        assert lifecycle.enqueue(uid, "study timeout (600 s after its last instance)")
        assert lifecycle.claim_next("test-worker") is not None
        lifecycle.finish(uid, StudyState.ANALYSED, "score 0.6")
        through(StudyState.REPORTING, StudyState.PARTLY_DELIVERED)
        assert sample("fpenode_completion_wait_seconds_count", trigger="ready") == 1
        assert sample("fpenode_completion_wait_seconds_count", trigger="timeout") == 1
        assert sample("fpenode_time_to_result_seconds_count", state="partly_delivered") == 1
        assert sample("fpenode_time_to_result_seconds_count", state="delivered") == 1
        wait = sample("fpenode_completion_wait_seconds_sum", trigger="ready")
        assert wait is not None and 0 <= wait < 60
    finally:
        node.stop(grace_s=1.0)

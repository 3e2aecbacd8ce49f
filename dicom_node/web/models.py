"""The read model shared by ``fpe-node studies``, the REST API and the console (pydantic models).

The REST API's OpenAPI document is generated from these classes. Times are aware UTC, except
``acquired_at`` (StudyDate/StudyTime, PS3.3 C.7.2.1: the scanner's local time, as given).

``patient_name`` and ``patient_id`` are ``None`` unless a caller allowed to see them asked
for them (:func:`dicom_node.web.queries.fill_patient`); the command line never fills them, and
they never appear in URLs or logs.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class StudySummary(_Model):
    """One study in a list: where it is in its life cycle and what it holds."""

    study_uid: str = Field(description="Study Instance UID (0020,000D).")
    state: str = Field(description="Life-cycle state (dicom_node.lifecycle.StudyState).")
    state_reason: str | None = Field(None, description="Why it is in that state (e.g. why not analysed).")
    accession: str | None = None
    description: str | None = None
    modalities: str = Field("", description="Modalities of its series, backslash-separated.")
    acquired_at: dt.datetime | None = Field(None, description="StudyDate + StudyTime, scanner local time.")
    first_received_at: dt.datetime | None = None
    last_received_at: dt.datetime | None = None
    calling_ae: str | None = Field(None, description="Calling AE title of the latest association (the sender).")
    series: int = Field(0, description="Number of series.")
    instances: int = Field(0, description="Number of instances.")
    dead_letters: int = Field(0, description="Result objects dead-lettered.")
    report_failures: int = Field(0, description="Times building or queueing its results failed.")
    patient_name: str | None = Field(None, description="Filled only for callers allowed to see it.")
    patient_id: str | None = Field(None, description="Filled only for callers allowed to see it.")


class SeriesSummary(_Model):
    """One series of a study."""

    series_uid: str
    number: int | None = None
    modality: str | None = None
    description: str | None = None
    manufacturer: str | None = None
    instances: int = 0
    last_received_at: dt.datetime | None = None
    complete_at: dt.datetime | None = Field(None, description="When it went quiet; empty while receiving.")


class TimelineEvent(_Model):
    """One entry of a study's timeline: it entered ``state`` at ``at``."""

    at: dt.datetime
    state: str
    detail: str | None = None


class AnalysisJob(_Model):
    """One time the study was put in the analysis queue."""

    state: str
    reason: str | None = None
    enqueued_at: dt.datetime | None = None
    claimed_at: dt.datetime | None = None
    attempts: int = 0
    outcome: str | None = None


class AnalysisRun(_Model):
    """One analysis of the study (the worker's record)."""

    at: dt.datetime
    outcome: str
    reason: str | None = None
    pipeline: str | None = None
    score: float | None = None
    positive: bool | None = None
    threshold: float | None = None
    model_name: str | None = None
    model_version: str | None = None
    weights_sha256: str | None = None
    demonstration: bool | None = None
    precision: str | None = Field(None, description="Precision the model ran in (fp32, bf16, fp16).")
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per stage.")
    warnings: list[str] = Field(default_factory=list)


class Delivery(_Model):
    """One result object for one destination (an outbox row)."""

    id: int = Field(description="Outbox row id (dead letters are retried and dropped by it).")
    study_uid: str
    sop_instance_uid: str
    kind: str = Field(description="sr, sc or pdf.")
    destination: str
    state: str = Field(description="pending, failed, sent, dead or held.")
    attempts: int
    sop_class_uid: str
    sent_sop_class_uid: str | None = None
    sent_sop_instance_uid: str | None = None
    last_status: int | None = Field(None, description="DICOM status of the last C-STORE response.")
    last_error: str | None = None
    next_try_at: dt.datetime | None = None
    deadline_at: dt.datetime | None = None
    sent_at: dt.datetime | None = None


class DeadLetter(Delivery):
    """A result object not stored before its deadline, with the study it belongs to."""

    study_state: str | None = None
    last_try_at: dt.datetime | None = None


class QuarantinedInstance(_Model):
    """An instance kept but left out of every case."""

    sop_instance_uid: str
    series_uid: str
    reason: str | None = None


class StudyDetail(StudySummary):
    """Everything about one study: series, timeline, analyses, jobs, deliveries, dead letters."""

    series_list: list[SeriesSummary] = Field(default_factory=list)
    timeline: list[TimelineEvent] = Field(default_factory=list)
    analyses: list[AnalysisRun] = Field(default_factory=list)
    jobs: list[AnalysisJob] = Field(default_factory=list)
    deliveries: list[Delivery] = Field(default_factory=list)
    dead_letter_list: list[DeadLetter] = Field(default_factory=list)
    quarantined: list[QuarantinedInstance] = Field(default_factory=list)


class WaitingStudy(_Model):
    """A study the node holds: not yet complete, queued, or being worked on, and why."""

    study_uid: str
    state: str
    since: dt.datetime | None = None
    why: str


class DiskUse(_Model):
    """The filesystem of ``storage.data_dir``."""

    total_bytes: int
    used_bytes: int
    used_pct: float
    high_watermark_pct: float


class WorkerStatus(_Model):
    """Inference workers and the model they serve."""

    configured: int
    alive: int | None = Field(None, description="Running worker processes; empty without a running node.")
    checkpoint: str | None = Field(None, description="Configured checkpoint (empty: the bundled default).")
    model_name: str | None = Field(None, description="Model of the latest analysis.")
    model_version: str | None = None
    weights_sha256: str | None = None
    demonstration: bool | None = Field(None, description="The latest analysis used demonstration weights.")


class Dashboard(_Model):
    """What arrived, what waits and why, what was delivered, what failed (last 24 h), and the node."""

    generated_at: dt.datetime
    arrived_24h: int = Field(description="Studies first received in the last 24 h.")
    delivered_24h: int = Field(description="Studies delivered in the last 24 h.")
    failures_24h: int = Field(description="Studies that failed (dead letters, report failures) in the last 24 h.")
    waiting: list[WaitingStudy]
    recent_failures: list[StudySummary] = Field(description="Studies that failed in the last 24 h (at most 20).")
    dead_letters: int = Field(description="Dead letters waiting for a retry or a drop.")
    queue_depth: int = Field(description="Studies queued for analysis.")
    outbox_depth: int = Field(description="Result objects waiting to be sent.")
    disk: DiskUse | None = None
    workers: WorkerStatus
    suspended: list[str] = Field(description="analysis and/or delivery, when suspended node-wide.")


class AuditRecord(_Model):
    """One entry of the audit trail: who did what, when, from where."""

    id: int
    at: dt.datetime
    actor: str
    action: str
    source: str | None = None
    detail: Any = Field(None, description="What changed (JSON).")


class Peer(_Model):
    """A system that may send to the node and/or receives its results."""

    name: str = Field(min_length=1, max_length=64)
    ae_titles: list[str] = Field(min_length=1, description="AE titles it uses.")
    host: str = Field("*", description="Host or IP address; '*' accepts any address.")
    port: int | None = Field(None, ge=1, le=65535, description="Port of its SCP (destinations, echo).")
    roles: list[str] = Field(default_factory=lambda: ["source"], description="source and/or destination.")


class User(_Model):
    """A console and API user (never its password hash)."""

    name: str
    role: str
    created_at: dt.datetime
    disabled: bool
    locked_until: dt.datetime | None = None


class Token(_Model):
    """An API token (never its secret)."""

    id: int
    name: str
    owner: str
    role: str
    created_at: dt.datetime
    last_used_at: dt.datetime | None = None
    expires_at: dt.datetime | None = None

"""When a study is complete: series quiet periods, pipeline readiness, study timeout, re-opening.

DICOM has no "end of study" message (a C-STORE association may carry part of a study, or
several studies, PS3.4 B.2), so the node decides from timing:

* a **series is complete** once no instance of it arrived for ``completion.series_quiet_s``;
  an association release (``completion.release_shortens_wait``) shortens that to a short
  grace period (:data:`RELEASE_GRACE_MAX_S`, at most a quarter of the quiet period) for the
  series the association sent, so a PACS that sends one series per association can open the
  next association before the study is judged;
* a series is **judged once it is complete**, from all its instances (``could_use`` with
  :attr:`SeriesInfo.complete` set): the first instance to arrive may not show what the series
  is (a GE head CT's 7 mm part before its 4 mm part), so until then ``could_use`` only says
  "wait": an image series still arriving holds the study back, whatever its first instance
  looked like. Non-image objects (SR, KO, PR, PDF, SC...) and the node's own results are
  excluded at once and never hold a study back;
* a **study is ready** when every image series is complete and judged and ``pipeline_ready``
  says the usable ones are enough;
* otherwise it is **forced complete** ``completion.study_timeout_s`` after its last instance
  and queued: the worker then decides, with the same rules, and a head study whose series are
  all unusable ends ``not_analysed`` with a reason naming each series (``not_eligible`` is the
  eligibility rules' verdict: priors, other body parts). Only a study holding no image at all
  (non-image objects, the node's own results) ends ``not_eligible`` here, without a worker;
* a ready study goes to the queue through :meth:`dicom_node.lifecycle.Lifecycle.enqueue`.

**Re-opening.** A series arriving after the study left ``received`` re-opens it only when it
is a *new* series (not one the study already had: a PACS that re-sends the whole study after
our results landed must not start a second analysis) and a pipeline could use it. Late
instances of a usable series the study already had pull it back only while it still waits in
the queue (``complete``/``queued``), so a worker never starts on a series still arriving. The node's
own results (SOP Instance or Series UID under ``uid.root``, or Manufacturer ``fpe-node``),
other systems' SR, SC, presentation states, KO, PDF and any series ``could_use`` rejects never
re-open a study: a PACS that routes results back would otherwise loop forever. The decision is
a timeline entry either way. A study being analysed or reported re-opens when that work is over.

**Restart.** :meth:`Completion.rebuild` re-creates the timers of every ``received`` study from
the index (receive times, ``series.complete_at``), and re-examines new series that arrived
after processing but were not yet acted on.

Timers run on an APScheduler ``BackgroundScheduler``; one check job per open study, moved only
when its deadline comes earlier (the C-STORE path only updates in-memory times).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.index.base import utcnow
from dicom_node.index.db import write_session
from dicom_node.index.models import Instance, Series, Study
from dicom_node.leases import NamedLease
from dicom_node.lifecycle import BUSY_STATES, PROCESSED_STATES, WAITING_STATES, Lifecycle, StudyState
from dicom_node.settings import CompletionSettings
from dicom_node.sop_classes import is_unknown_storage_class

log = logging.getLogger(__name__)

OWN_MANUFACTURER = "fpe-node"
"""Manufacturer (0008,0070) of every object the node builds (``reports.sr.MANUFACTURER``)."""

NO_PIPELINE_COULD_USE = "no pipeline could use it; not re-opened"

RELEASE_GRACE_MAX_S = 1.0
"""Longest wait after an association release before its series count as quiet."""

_IGNORED_MEMORY = 10_000  # series remembered as "does not re-open", per process

# Storage SOP classes that carry no image a pipeline reads (PS3.4 B.5 / PS3.6 Annex A).
_NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, incl. dose SR and Key Object Selection
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF, CDA, STL...
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration, fiducials, segmentation
    "1.2.840.10008.5.1.4.1.1.481.",  # radiotherapy objects
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.5.1.4.1.1.7",  # secondary capture, single and multi-frame
    "1.2.840.10008.5.1.4.1.1.30",  # parametric maps (other systems' results)
)
_NON_IMAGE_MODALITIES = frozenset(
    {"SR", "PR", "KO", "DOC", "REG", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "PLAN", "ECG", "AU", "OT"}
)


class StoredInstanceLike(Protocol):
    """What completion reads of an instance the SCP stored (``dicom_node.scp.StoredInstance``)."""

    @property
    def study_uid(self) -> str: ...
    @property
    def series_uid(self) -> str: ...
    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def sop_class_uid(self) -> str: ...
    @property
    def modality(self) -> str | None: ...
    @property
    def manufacturer(self) -> str | None: ...
    @property
    def series_description(self) -> str | None: ...
    @property
    def image_type(self) -> tuple[str, ...]: ...
    @property
    def path(self) -> Path | None: ...


@dataclass(frozen=True)
class SeriesInfo:
    """What readiness rules see of one series (built from a stored instance or from the index).

    ``path`` is one of its files (absolute); readiness reads headers from the index, not from it.
    """

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    modality: str | None = None
    manufacturer: str | None = None
    series_description: str | None = None
    image_type: tuple[str, ...] = ()
    instance_count: int = 0
    path: Path | None = None
    complete: bool = False  # the series is complete: judge it on all its instances
    header: Any = field(default=None, compare=False, repr=False)
    """The ``inference.dicom_headers.InstanceHeader`` of ``sop_instance_uid`` when the caller has it
    (the C-STORE handler's parse); readiness otherwise takes the index's copy."""


CouldUse = Callable[[SeriesInfo], bool]
PipelineReady = Callable[[Sequence[SeriesInfo]], bool]
ReadyHook = Callable[[str, str], bool]


def is_non_image(series: SeriesInfo) -> bool:
    """True for SR, presentation states, KO, PDF, SC, RT, waveforms, segmentations... (no pipeline input).

    Storage classes the node accepts without knowing them (vendors' private classes, newer
    standard ones: :func:`dicom_node.sop_classes.is_unknown_storage_class`) are stored and
    indexed but never analysed, so they count here too and never hold a study back.
    """
    if any(series.sop_class_uid.startswith(prefix) for prefix in _NON_IMAGE_SOP_PREFIXES):
        return True
    if is_unknown_storage_class(series.sop_class_uid):
        return True
    return (series.modality or "").upper() in _NON_IMAGE_MODALITIES


def default_could_use(series: SeriesInfo) -> bool:
    """Until selection rules are plugged in every image series counts (issue 2 item 7)."""
    return not is_non_image(series)


def default_pipeline_ready(series: Sequence[SeriesInfo]) -> bool:
    """Until selection rules are plugged in, any complete usable series is enough."""
    return len(series) > 0


def is_own_result(series: SeriesInfo, uid_root: str | None) -> bool:
    """True for objects the node itself built: its UID root or its Manufacturer.

    Without a site UID root the node makes ``2.25.`` UUID UIDs (PS3.5 B.2), which say
    nothing of their maker; the Manufacturer check still holds.
    """
    if (series.manufacturer or "").strip().lower() == OWN_MANUFACTURER:
        return True
    if uid_root:
        prefix = uid_root.rstrip(".") + "."
        return series.series_uid.startswith(prefix) or series.sop_instance_uid.startswith(prefix)
    return False


def never_usable(series: SeriesInfo, uid_root: str | None) -> bool:
    """True for series no pipeline can ever use, whatever else arrives: non-images and the node's own results."""
    return is_own_result(series, uid_root) or is_non_image(series)


def series_info_of(instance: StoredInstanceLike, path: Path | None = None) -> SeriesInfo:
    """The :class:`SeriesInfo` of the series a stored instance belongs to."""
    return SeriesInfo(
        study_uid=instance.study_uid,
        series_uid=instance.series_uid,
        sop_class_uid=instance.sop_class_uid,
        sop_instance_uid=instance.sop_instance_uid,
        modality=instance.modality,
        manufacturer=instance.manufacturer,
        series_description=instance.series_description,
        image_type=tuple(instance.image_type or ()),
        instance_count=1,
        path=path if path is not None else instance.path,
        header=getattr(instance, "header", None),
    )


class SelectionReadiness:
    """``could_use`` / ``pipeline_ready`` from the inference package's series selection rules.

    Headers come from the index (``instance.header``, kept by the C-STORE handler's one parse,
    :mod:`dicom_node.headers`), never from the files: ``could_use`` of a series still arriving
    judges the header its :class:`SeriesInfo` carries (or the index's header of that instance),
    a first guess which completion treats as "wait"; of a complete series
    (:attr:`SeriesInfo.complete`) it judges the stored headers of every instance of the series.
    ``pipeline_ready`` does the same for the complete usable series and asks the selector whether
    a pipeline is ready. Summaries are cached per series and instance count. An instance whose
    header could not be read drops out (logged with its SOP Instance UID); it never decides the
    series. A series without any usable header falls back to :func:`default_could_use`.

    Parameters
    ----------
    selector:
        An ``inference.selection.Selector`` (built once with the site's rules).
    sessions:
        Session factory of the index.
    data_dir:
        ``settings.storage.data_dir`` (where rows indexed before headers were kept are read once).
    """

    def __init__(self, selector: Any, sessions: sessionmaker[Session], data_dir: Path) -> None:
        self.selector = selector
        self._sessions = sessions
        self._data_dir = data_dir
        self._cache: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()

    def could_use(self, series: SeriesInfo) -> bool:
        """True when the series could fill a role of some pipeline (judged on all of it once complete)."""
        from inference.dicom_headers import summarise_series

        if series.complete:
            summary = self._series_header(series)
            if summary is None:
                return default_could_use(series)
            return bool(self.selector.could_use(summary, complete=True))
        header = series.header if series.header is not None else self._instance_header(series.sop_instance_uid)
        if header is None or getattr(header, "problem", None) is not None:
            return default_could_use(series)
        return bool(self.selector.could_use(summarise_series([header])))

    def pipeline_ready(self, series: Sequence[SeriesInfo]) -> bool:
        """True when these complete series make at least one pipeline ready."""
        headers = [header for header in (self._series_header(info) for info in series) if header is not None]
        return bool(headers) and bool(self.selector.pipeline_ready(headers))

    def _instance_header(self, sop_instance_uid: str) -> Any:
        from dicom_node.headers import header_rows, usable_headers

        with self._sessions() as session:
            rows = header_rows(session.execute(
                select(Instance.id, Instance.sop_instance_uid, Instance.path, Instance.header)
                .where(Instance.sop_instance_uid == sop_instance_uid, Instance.quarantine_reason.is_(None))
            ).all())
        headers = usable_headers(self._sessions, self._data_dir, rows)
        return headers[0] if headers else None

    def _series_header(self, series: SeriesInfo) -> Any:
        from dicom_node.headers import header_rows, usable_headers
        from inference.dicom_headers import summarise_series

        query = (select(func.count(Instance.id)).join(Series, Series.id == Instance.series_pk)
                 .where(Series.series_uid == series.series_uid, Instance.quarantine_reason.is_(None)))
        with self._sessions() as session:
            count = int(session.execute(query).scalar_one())
            key = (series.series_uid, count)
            with self._lock:
                if key in self._cache:
                    return self._cache[key]
            rows = header_rows(session.execute(
                select(Instance.id, Instance.sop_instance_uid, Instance.path, Instance.header)
                .join(Series, Series.id == Instance.series_pk)
                .where(Series.series_uid == series.series_uid, Instance.quarantine_reason.is_(None))
                .order_by(Instance.id)
            ).all())
        headers = usable_headers(self._sessions, self._data_dir, rows)
        summary = summarise_series(headers) if headers else None
        with self._lock:
            self._cache[(series.series_uid, len(rows))] = summary
            while len(self._cache) > 256:
                self._cache.pop(next(iter(self._cache)))
        return summary


@dataclass
class _SeriesTrack:
    info: SeriesInfo
    usable: bool  # a first guess until ``judged``
    last_at: float
    count: int = 1
    complete: bool = False
    released_at: float | None = None
    judged: bool = False  # ``usable`` was decided on the complete series (or the series can never be used)
    reopen_if_usable: tuple[str, str] | None = None  # (reason, state at arrival): a new series of a processed study


@dataclass
class _StudyTrack:
    study_uid: str
    last_at: float
    series: dict[str, _SeriesTrack] = field(default_factory=dict)
    check_at: float | None = None  # monotonic deadline of the scheduled check
    version: int = 0  # bumped by every arrival, so a check can tell if it judged stale facts
    reopen: str | None = None  # re-open reason waiting for busy work to end


class Completion:
    """Decides when studies are ready; an ``IngestListener`` of the SCP.

    Parameters
    ----------
    completion:
        ``settings.completion``.
    lifecycle:
        Queue and transitions; :meth:`Lifecycle.enqueue` is the "study ready" hook.
    sessions:
        Session factory of the index.
    scheduler:
        A started (or later started) APScheduler scheduler; jobs use ids ``completion:<uid>``.
    data_dir:
        ``settings.storage.data_dir`` (instance paths in the index are relative to it).
    uid_root:
        ``settings.uid.root``: objects under it are the node's own results.
    could_use, pipeline_ready:
        Readiness rules (the selection rules of the inference package supply real ones).
    on_series_complete:
        Called with each usable series once it is complete (e.g. to pre-load its volume);
        runs on the scheduler's threads, errors are logged.
    clock:
        Monotonic clock (tests may pass their own).
    lease:
        Several receivers on one index (role ``receiver``): the ``completion`` lease
        (:class:`dicom_node.leases.NamedLease`). Every receiver times what it receives, but only
        the lease holder queues studies; it also follows the studies other receivers received
        from the index (:meth:`follow_index`), so a study split across receivers is judged on
        all its series, and a new holder takes over every open study when the old one stops.
        ``None`` (role ``all``): this process is the only receiver.
    """

    def __init__(
        self,
        completion: CompletionSettings,
        lifecycle: Lifecycle,
        sessions: sessionmaker[Session],
        scheduler: BaseScheduler,
        *,
        data_dir: Path,
        uid_root: str | None = None,
        could_use: CouldUse = default_could_use,
        pipeline_ready: PipelineReady = default_pipeline_ready,
        on_series_complete: Sequence[Callable[[SeriesInfo], None]] = (),
        clock: Callable[[], float] = time.monotonic,
        lease: NamedLease | None = None,
    ) -> None:
        self._lease = lease
        self._settings = completion
        self._lifecycle = lifecycle
        self._sessions = sessions
        self._scheduler = scheduler
        self._data_dir = data_dir
        self._uid_root = uid_root
        self._could_use = could_use
        self._pipeline_ready = pipeline_ready
        self._on_series_complete = tuple(on_series_complete)
        self._clock = clock
        self._lock = threading.RLock()
        self._studies: dict[str, _StudyTrack] = {}
        self._ignored: OrderedDict[str, None] = OrderedDict()
        self._quiet = completion.series_quiet_s
        self._timeout = completion.study_timeout_s
        self._grace = min(RELEASE_GRACE_MAX_S, completion.series_quiet_s / 4)
        self._checks = 0
        self._checked = threading.Condition(self._lock)

    @property
    def checks_run(self) -> int:
        """Study checks finished so far (tests and diagnostics wait on it)."""
        with self._lock:
            return self._checks

    def wait_for_checks(self, count: int, timeout_s: float) -> bool:
        """Wait until at least ``count`` study checks have finished; False on timeout."""
        with self._checked:
            return self._checked.wait_for(lambda: self._checks >= count, timeout_s)

    # -- IngestListener -----------------------------------------------------------------

    def instance_stored(self, info: StoredInstanceLike) -> None:
        """Called by the SCP after an instance is on disk and indexed."""
        now = self._clock()
        with self._lock:
            study = self._studies.get(info.study_uid)
            track = study.series.get(info.series_uid) if study is not None else None
            if study is not None and track is not None:
                reopened_series = track.complete
                track.last_at = study.last_at = now
                track.count += 1
                study.version += 1
                track.complete, track.released_at = False, None
                track.judged = self._never_usable(track.info)  # more instances: judge the series again
                self._ensure_check(study)
            elif info.series_uid in self._ignored:
                return
        if study is not None and track is not None:
            if reopened_series:
                self._set_series_complete(info.series_uid, None)
            return
        series = series_info_of(info)
        try:
            # a new SOP instance (not a differing copy of one already held: a PACS re-sending)
            self._admit_series(series, now, new_instance=not getattr(info, "replaced", False))
        except Exception:  # noqa: BLE001 - never lose a series: time it as a plain arrival
            log.exception("study %s: could not judge new series %s; timing it as received", info.study_uid, info.series_uid)
            self._track(series, now, usable=default_could_use(series))

    def association_released(self, series_uids: Iterable[str]) -> None:
        """The series an association sent count as quiet after a short grace period."""
        if not self._settings.release_shortens_wait:
            return
        now = self._clock()
        with self._lock:
            for study in self._studies.values():
                touched = False
                for series_uid, track in study.series.items():
                    if series_uid in series_uids and not track.complete:
                        track.released_at = now
                        touched = True
                if touched:
                    self._schedule(study, now + self._grace)

    # -- start and restart -----------------------------------------------------------------

    def start(self) -> int:
        """Rebuild timers from the index and install the sweeper; returns the open studies.

        The sweeper (every quiet period) re-arms any study whose check is overdue, so a timer
        lost by the scheduler cannot leave a study waiting forever.
        """
        opened = self.rebuild()
        self._scheduler.add_job(
            self._sweep, trigger="interval", seconds=max(self._quiet, 1.0), id="completion:sweep",
            replace_existing=True, coalesce=True, max_instances=1,
        )
        if self._lease is not None:
            self._hold_lease()
            self._scheduler.add_job(
                self._hold_lease, trigger="interval", seconds=max(0.5, min(self._lease.lease_s / 3, self._quiet / 2)),
                id="completion:lease", replace_existing=True, coalesce=True, max_instances=1,
            )
        return opened

    def release(self) -> None:
        """Give the ``completion`` lease up at a clean stop (another receiver takes over at once)."""
        if self._lease is not None:
            try:
                self._lease.release()
            except Exception:  # noqa: BLE001 - the lease then simply runs out
                log.warning("completion lease not released; it runs out by itself", exc_info=True)

    @property
    def decides(self) -> bool:
        """Whether this process queues ready studies (the only receiver, or the lease holder)."""
        return self._lease is None or self._lease.held

    def _hold_lease(self) -> None:
        """Take or renew the ``completion`` lease; the holder follows every open study from the index."""
        try:
            held = self._lease is not None and self._lease.hold()
        except Exception:  # noqa: BLE001 - the index away for a moment: the lease runs out if it stays away
            log.warning("completion lease not renewed (index unreachable?)", exc_info=True)
            return
        if held:
            try:
                self.follow_index()
            except Exception:  # noqa: BLE001 - retried at the next tick
                log.exception("completion: following the index failed; retrying")

    def follow_index(self) -> int:
        """Bring the timers up to date with what every receiver indexed; returns the studies touched.

        A ``received`` study this process does not time gets its timers from the index (as at a
        restart); for one it times, a series it has not seen is added and a series another
        receiver got newer instances of counts from their arrival, so its quiet period restarts.
        """
        infos = [item for item in self._series_from_index() if item[1] is StudyState.RECEIVED]
        now_mono, now_utc = self._clock(), utcnow()
        touched = 0
        for study_uid, _state, rows in infos:
            with self._lock:
                study = self._studies.get(study_uid)
                if study is None:
                    study = self._studies[study_uid] = _StudyTrack(study_uid, now_mono)
                changed = False
                for info, last_received, complete in rows:
                    at = now_mono - max(0.0, (now_utc - last_received).total_seconds())
                    track = study.series.get(info.series_uid)
                    if track is None:
                        never = self._never_usable(info)
                        study.series[info.series_uid] = _SeriesTrack(
                            info, self._usable(info) and not never, at, info.instance_count, complete, judged=never,
                        )
                        changed = True
                    elif info.instance_count > track.count and at > track.last_at + 1e-3:
                        track.last_at, track.count = at, info.instance_count
                        track.complete, track.released_at = False, None
                        track.judged = self._never_usable(track.info)
                        changed = True
                if changed:
                    study.version += 1
                    study.last_at = max([study.last_at, *(t.last_at for t in study.series.values())])
                    touched += 1
                    self._schedule(study, min(self._next_deadline(study), now_mono))
        return touched

    def _sweep(self) -> None:
        now = self._clock()
        with self._lock:
            overdue = [s for s in self._studies.values() if s.check_at is not None and s.check_at < now - 1.0]
            for study in overdue:
                study.check_at = None
                self._schedule(study, now)
        if overdue:
            log.warning("completion: %d overdue study checks re-armed", len(overdue))

    def rebuild(self) -> int:
        """Re-create timers from the index after a restart; returns the number of open studies.

        ``received`` studies get their series back with their receive times; new series of
        studies that left ``received`` (``complete_at`` still empty) are judged for re-opening.
        """
        infos = self._series_from_index()
        now_mono, now_utc = self._clock(), utcnow()
        opened = 0
        for study_uid, state, rows in infos:
            if state is StudyState.RECEIVED:
                with self._lock:
                    study = self._studies.setdefault(study_uid, _StudyTrack(study_uid, now_mono))
                    for info, last_received, complete in rows:
                        age = max(0.0, (now_utc - last_received).total_seconds())
                        never = self._never_usable(info)
                        study.series[info.series_uid] = _SeriesTrack(
                            info, self._usable(info) and not never, now_mono - age, info.instance_count, complete,
                            judged=never,
                        )
                    if study.series:
                        study.last_at = max(track.last_at for track in study.series.values())
                    self._schedule(study, now_mono)
                opened += 1
            else:
                for info, _last, complete in rows:
                    if not complete:
                        self._admit_series(info, now_mono)
        if opened:
            log.info("completion timers rebuilt for %d received studies", opened)
        return opened

    def open_studies(self) -> list[str]:
        """Study UIDs with timers (for tests and the start-up log)."""
        with self._lock:
            return sorted(self._studies)

    # -- deciding about a series seen for the first time -------------------------------

    def _usable(self, info: SeriesInfo) -> bool:
        """First guess on a series still arriving (judged again on all of it once complete)."""
        return not is_own_result(info, self._uid_root) and self._rule_could_use(info)

    def _never_usable(self, info: SeriesInfo) -> bool:
        return never_usable(info, self._uid_root)

    def _rule_could_use(self, info: SeriesInfo) -> bool:
        """``could_use``; a rule that fails falls back to :func:`default_could_use` (logged)."""
        try:
            return self._could_use(info)
        except Exception:  # noqa: BLE001 - a broken rule must not stall completion
            log.exception("could_use failed for series %s; using the default rule", info.series_uid)
            return default_could_use(info)

    def _rule_pipeline_ready(self, series: Sequence[SeriesInfo]) -> bool:
        """``pipeline_ready``; a rule that fails counts as not ready (the study timeout still applies)."""
        try:
            return self._pipeline_ready(series)
        except Exception:  # noqa: BLE001 - a broken rule must not stall completion
            log.exception("pipeline_ready failed for study %s; waiting for the study timeout", series[0].study_uid)
            return False

    def _admit_series(self, info: SeriesInfo, now: float, *, new_instance: bool = False) -> None:
        """Track a series not tracked now; re-open its study when it left ``received`` and may.

        ``new_instance``: the instance has a SOP Instance UID the node did not hold before.
        Such instances of a series the study already had mean its result was built on part of
        the series (the sender paused longer than the quiet period): the study is re-opened and
        analysed again on all of it (a new SR naming its predecessor). A differing copy of an
        instance already held (``replaced``: a PACS re-sending the study) never re-opens it, and
        identical copies never reach completion.
        """
        state, known = self._study_and_series_state(info.study_uid, info.series_uid)
        if state is None or state is StudyState.RECEIVED:
            self._track(info, now, usable=self._usable(info))
            return
        # a purged study's rows are gone: what arrives for it is a re-sent study, not new data
        more_data = known and new_instance and state is not StudyState.PURGED
        why_not = self._why_no_reopen(info, known and not more_data, state)
        what = "more instances of series" if known else "new series"
        if why_not == NO_PIPELINE_COULD_USE and (not known or more_data):
            # a first guess on the first instance: judge the whole series once it is complete
            reason = f"re-opened by {what} {info.series_uid} ({info.modality or '?'})"
            self._track(info, now, usable=False, reopen_if_usable=(reason, state.value))
            return
        if why_not is not None:
            self._remember_ignored(info.series_uid)
            if not known:
                self._set_series_complete(info.series_uid, utcnow())
                self._lifecycle.note(info.study_uid, f"series {info.series_uid} arrived while {state.value}: {why_not}")
            log.info("study %s not re-opened by series %s: %s", info.study_uid, info.series_uid, why_not)
            return
        reason = f"re-opened by {what} {info.series_uid} ({info.modality or '?'})"
        if state in BUSY_STATES:
            self._track(info, now, usable=True, reopen=reason)
            self._lifecycle.note(info.study_uid, f"series {info.series_uid} arrived while {state.value}; re-open when done")
            return
        if self._lifecycle.reopen(info.study_uid, reason) is None:  # became busy meanwhile
            self._track(info, now, usable=True, reopen=reason)
            return
        self._track(info, now, usable=True)

    def _why_no_reopen(self, info: SeriesInfo, known: bool, state: StudyState) -> str | None:
        """Why this series must not re-open the study, or ``None`` when it may.

        More instances of a series the study already had may pull a *waiting* study back (no
        result exists yet, and the worker should see the whole series), never a busy or
        processed one (a PACS re-sending the study with our results must not loop).
        """
        if known and state not in WAITING_STATES:
            return "a series the study already had (late or repeated instance); not re-opened"
        if is_own_result(info, self._uid_root):
            return "the node's own result; not re-opened"
        if is_non_image(info):
            return f"another system's {info.modality or 'non-image'} object; not re-opened"
        if not self._rule_could_use(info):
            return NO_PIPELINE_COULD_USE
        return None

    def _track(
        self, info: SeriesInfo, now: float, *, usable: bool, reopen: str | None = None,
        reopen_if_usable: tuple[str, str] | None = None,
    ) -> None:
        with self._lock:
            study = self._studies.get(info.study_uid)
            if study is None:
                study = self._studies[info.study_uid] = _StudyTrack(info.study_uid, now)
            track = study.series.get(info.series_uid)
            never = self._never_usable(info)
            if track is None:
                study.series[info.series_uid] = _SeriesTrack(
                    info, usable and not never, now, judged=never, reopen_if_usable=reopen_if_usable
                )
            else:
                track.last_at, track.complete = now, False
                track.judged = self._never_usable(info)
                track.count += 1
            study.last_at = now
            study.version += 1
            if reopen is not None:
                study.reopen = reopen
            self._ensure_check(study)

    def _remember_ignored(self, series_uid: str) -> None:
        with self._lock:
            self._ignored[series_uid] = None
            while len(self._ignored) > _IGNORED_MEMORY:
                self._ignored.popitem(last=False)

    # -- timers -------------------------------------------------------------------------

    def _ensure_check(self, study: _StudyTrack) -> None:
        """Schedule a check if none is pending (a later deadline is found when it runs)."""
        if study.check_at is None:
            self._schedule(study, study.last_at + min(self._quiet, self._timeout))

    def _schedule(self, study: _StudyTrack, at: float) -> None:
        if study.check_at is not None and study.check_at <= at:
            return
        study.check_at = at
        delay = max(0.0, at - self._clock())
        self._scheduler.add_job(
            self._check,
            trigger="date",
            run_date=dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=delay),
            args=[study.study_uid],
            id=f"completion:{study.study_uid}",
            replace_existing=True,
            misfire_grace_time=None,
            coalesce=True,
            max_instances=4,  # a check that reschedules itself must not be skipped as "still running"
        )

    def _check(self, study_uid: str) -> None:
        """Timer callback: mark quiet series complete, then decide whether the study is ready.

        ``pipeline_ready`` may read many headers, so it runs outside the lock; if an instance
        of the study arrived meanwhile, the verdict is dropped and the study looked at again.
        """
        try:
            self._check_study(study_uid)
        finally:
            with self._checked:
                self._checks += 1
                self._checked.notify_all()

    def _check_study(self, study_uid: str) -> None:
        now = self._clock()
        with self._lock:
            study = self._studies.get(study_uid)
            if study is None:
                return
            study.check_at = None
            newly_complete = self._close_quiet_series(study, now)
            to_judge = [(t, replace(t.info, complete=True, instance_count=t.count))
                        for t in study.series.values() if t.complete and not t.judged]
            version = study.version
        for track in newly_complete:  # series.complete_at, shown by `fpe-node studies --study`
            self._set_series_complete(track.info.series_uid, utcnow())
        verdicts = [(track, info, self._usable(info)) for track, info in to_judge]  # reads headers: outside the lock
        applied: list[tuple[_SeriesTrack, bool]] = []
        with self._lock:
            for track, info, usable in verdicts:
                if track.complete and track.count == info.instance_count:  # no instance arrived meanwhile
                    track.usable, track.judged = usable, True
                    applied.append((track, usable))
        for track, usable in applied:
            log.debug("study %s: complete series %s judged %s", study_uid, track.info.series_uid,
                      "usable" if usable else "unusable")
            if track.reopen_if_usable is not None:
                self._reopen_if_usable(study, track, usable)
            if usable:
                self._tell_series_complete(track.info)
        with self._lock:
            if not study.series:  # only new series of a processed study, none usable: nothing left to time
                if self._studies.get(study_uid) is study:
                    del self._studies[study_uid]
                return
            candidates = self._ready_candidates(study)
        ready = candidates is not None and self._rule_pipeline_ready(candidates)
        with self._lock:
            if self._studies.get(study_uid) is not study:
                return  # another check of the same study decided meanwhile
            decision = None if study.version != version else self._readiness(study, ready, now)
            if decision is None:
                self._schedule(study, self._next_deadline(study))
            else:
                del self._studies[study_uid]
        if decision is not None:
            try:
                self._study_ready(study, *decision)
            except Exception:  # noqa: BLE001 - a timer must not lose a study: log and look again
                log.exception("study %s: readiness step failed; retrying in %g s", study_uid, self._quiet)
                self._retry_later(study)

    def _reopen_if_usable(self, study: _StudyTrack, track: _SeriesTrack, usable: bool) -> None:
        """A new series of a processed study, judged on all of it: re-open the study, or note why not."""
        assert track.reopen_if_usable is not None
        reason, arrived_while = track.reopen_if_usable
        track.reopen_if_usable = None
        info = track.info
        if not usable:
            self._remember_ignored(info.series_uid)
            with self._lock:
                study.series.pop(info.series_uid, None)
            self._lifecycle.note(info.study_uid, f"series {info.series_uid} arrived while {arrived_while}: {NO_PIPELINE_COULD_USE}")
            log.info("study %s not re-opened by series %s: %s", info.study_uid, info.series_uid, NO_PIPELINE_COULD_USE)
            return
        state = self._lifecycle.state_of(info.study_uid)
        if state in BUSY_STATES or state is None or self._lifecycle.reopen(info.study_uid, reason) is None:
            with self._lock:
                study.reopen = reason  # re-opened when the work in progress is over
            self._lifecycle.note(info.study_uid, f"series {info.series_uid} arrived while {arrived_while}; re-open when done")

    def _tell_series_complete(self, series: SeriesInfo) -> None:
        for callback in self._on_series_complete:
            try:
                callback(series)
            except Exception:  # noqa: BLE001 - a helper's failure must not stop completion
                log.exception("series-complete callback failed for series %s", series.series_uid)

    def _retry_later(self, study: _StudyTrack) -> None:
        with self._lock:
            self._studies.setdefault(study.study_uid, study)
            self._schedule(study, self._clock() + self._quiet)

    def _close_quiet_series(self, study: _StudyTrack, now: float) -> list[_SeriesTrack]:
        closed = []
        for track in study.series.values():
            if track.complete:
                continue
            released = track.released_at is not None and now - track.released_at >= self._grace - 1e-3
            if released or now - track.last_at >= self._quiet - 1e-3:
                track.complete = True
                closed.append(track)
        return closed

    @staticmethod
    def _ready_candidates(study: _StudyTrack) -> list[SeriesInfo] | None:
        """The usable series once every series is complete and judged (worth asking ``pipeline_ready``).

        A series still arriving, or complete but not yet judged on all its instances, holds the
        study: its first instances may not show what it is ("wait").
        """
        if not all(t.judged for t in study.series.values()):
            return None
        usable = [t for t in study.series.values() if t.usable]
        return [t.info for t in usable] if usable else None

    def _readiness(self, study: _StudyTrack, pipeline_ready: bool, now: float) -> tuple[str, bool] | None:
        """``(reason, has_images)`` when the study is ready or timed out, else ``None``."""
        candidates = self._ready_candidates(study)
        if pipeline_ready and candidates is not None:
            return f"{len(candidates)} usable series complete", True
        if now - study.last_at >= self._timeout - 1e-3:
            has_images = any(not self._never_usable(t.info) for t in study.series.values())
            usable = sum(t.usable and t.judged for t in study.series.values())
            detail = "" if usable else "; no series a pipeline could use, the analysis says why"
            return f"study timeout ({self._timeout:g} s after its last instance){detail}", has_images
        return None

    def _next_deadline(self, study: _StudyTrack) -> float:
        deadlines = [study.last_at + self._timeout]
        for track in study.series.values():
            if not track.complete:
                deadlines.append(track.last_at + self._quiet)
                if track.released_at is not None:
                    deadlines.append(track.released_at + self._grace)
        return min(deadlines)

    # -- the study is ready ---------------------------------------------------------------

    def _study_ready(self, study: _StudyTrack, reason: str, has_images: bool) -> None:
        if not self.decides:
            log.debug("study %s ready here; the completion lease holder queues it", study.study_uid)
            return
        if self._lease is not None and self._arrived_elsewhere(study):
            self.follow_index()  # another receiver got instances meanwhile: judge them too
            self._retry_later(study)
            return
        state = self._lifecycle.state_of(study.study_uid)
        if state in BUSY_STATES:  # analysis or reporting still running: look again later
            self._retry_later(study)
            return
        if study.reopen is not None and (state in PROCESSED_STATES | WAITING_STATES or state is StudyState.PURGED):
            if self._lifecycle.reopen(study.study_uid, study.reopen) is None:
                self._retry_later(study)
                return
            state = StudyState.RECEIVED
        if state is not StudyState.RECEIVED:
            log.debug("study %s ready but %s; nothing to do", study.study_uid, state)
            return
        self._mark_all_series_complete(study.study_uid)
        if not has_images:  # nothing but non-image objects: nothing for a worker to say
            self._lifecycle.transition(study.study_uid, StudyState.COMPLETE, reason)
            self._lifecycle.transition(
                study.study_uid, StudyState.NOT_ELIGIBLE, f"no series any pipeline could use ({len(study.series)} received)"
            )
            return
        self._lifecycle.enqueue(study.study_uid, reason)

    # -- index access ---------------------------------------------------------------------

    def _arrived_elsewhere(self, study: _StudyTrack) -> bool:
        """An instance of the study arrived (at any receiver) after the last one this process timed."""
        with self._sessions() as session:
            last = session.scalar(select(Study.last_received_at).where(Study.study_uid == study.study_uid))
        if last is None:
            return False
        age = max(0.0, (utcnow() - last).total_seconds())
        return self._clock() - age > study.last_at + 0.5

    def _study_and_series_state(self, study_uid: str, series_uid: str) -> tuple[StudyState | None, bool]:
        """The study's state and whether the series was already known (``complete_at`` set)."""
        with self._sessions() as session:
            row = session.execute(
                select(Study.state, Series.complete_at)
                .select_from(Study)
                .outerjoin(Series, (Series.study_pk == Study.id) & (Series.series_uid == series_uid))
                .where(Study.study_uid == study_uid)
            ).one_or_none()
        if row is None:
            return None, False
        return StudyState(row.state), row.complete_at is not None

    def _set_series_complete(self, series_uid: str, at: dt.datetime | None) -> None:
        with write_session(self._sessions) as session:
            session.execute(
                update(Series).where(Series.series_uid == series_uid).values(complete_at=at)
                .execution_options(synchronize_session=False)
            )

    def _mark_all_series_complete(self, study_uid: str) -> None:
        """Every series of a study leaving ``received`` counts as known (see re-opening)."""
        with write_session(self._sessions) as session:
            study_pk = session.execute(select(Study.id).where(Study.study_uid == study_uid)).scalar_one()
            session.execute(
                update(Series)
                .where(Series.study_pk == study_pk, Series.complete_at.is_(None))
                .values(complete_at=utcnow())
                .execution_options(synchronize_session=False)
            )

    def _series_from_index(self) -> list[tuple[str, StudyState, list[tuple[SeriesInfo, dt.datetime, bool]]]]:
        """Studies with open series: received ones, and others with series not yet judged."""
        with self._sessions() as session:
            studies = session.execute(
                select(Study.id, Study.study_uid, Study.state).where(
                    (Study.state == StudyState.RECEIVED.value)
                    | Study.id.in_(select(Series.study_pk).where(Series.complete_at.is_(None)))
                )
            ).all()
            result = []
            for study_pk, study_uid, state in studies:
                rows = [self._series_row(session, study_uid, series) for series in
                        session.execute(select(Series).where(Series.study_pk == study_pk)).scalars()]
                result.append((study_uid, StudyState(state), [row for row in rows if row is not None]))
        return result

    def _series_row(self, session: Session, study_uid: str, series: Series) -> tuple[SeriesInfo, dt.datetime, bool] | None:
        first = session.execute(
            select(Instance.sop_class_uid, Instance.sop_instance_uid, Instance.path)
            .where(Instance.series_pk == series.id, Instance.quarantine_reason.is_(None)).order_by(Instance.id).limit(1)
        ).one_or_none()
        if first is None:
            return None
        info = SeriesInfo(
            study_uid=study_uid,
            series_uid=series.series_uid,
            sop_class_uid=first.sop_class_uid,
            sop_instance_uid=first.sop_instance_uid,
            modality=series.modality,
            manufacturer=series.manufacturer,
            series_description=series.description,
            image_type=tuple(v for v in (series.image_type or "").split("\\") if v),
            instance_count=series.instance_count,
            path=self._data_dir / first.path,
        )
        return info, series.last_received_at, series.complete_at is not None


"""The node's transport adapter for pynetdicom: connection admission and protocol limits.

pynetdicom's association server starts a thread for every TCP connection and counts it against
``maximum_associations`` from the first byte, reads a PDU of whatever length its header
declares, and assembles a data set of any size. This module puts a front door before it:

* **Admission** (:meth:`NodeAssociationServer.verify_request`, before any thread starts): a
  token bucket of new connections per source address, and a cap on connections that have not
  yet delivered their A-ASSOCIATE-RQ ("pending"), per address and in all; pending connections
  are counted apart from the association slots, so they can never use those up.
* **A deadline for the A-ASSOCIATE-RQ** (``associate_rq_timeout_s``): the ACSE/ARTIM timer of
  a new connection runs on it until the request has been read whole (PS3.8 section 9.1.5).
* **TLS** (the secure transport listener, PS3.15 Annex B): the handshake runs on the
  connection's own thread after admission, never on the accepting thread (pynetdicom's own
  ``ssl_context`` would block every other sender behind a silent client), and must end within
  the same ``associate_rq_timeout_s``; a failed one (no or an untrusted or expired client
  certificate, plain DICOM on the TLS port) is refused and logged with OpenSSL's reason.
* **Association slots** (:meth:`FrontDoor.admit_association`, called from the EVT_REQUESTED
  handler in :mod:`dicom_node.scp`): at most ``max_associations`` established or negotiating
  associations, at most ``max_associations_per_peer`` of one peer.
* **PDU limits** (:class:`GuardedSocket`, where the DUL reads the 6-byte PDU header, before
  the body is read): an A-ASSOCIATE-RQ (or any other non-data PDU) over
  ``max_associate_rq_bytes``, a P-DATA-TF over the advertised maximum PDU length (PS3.8
  section D.1), a data set over ``max_dataset_bytes``, a Deflated Explicit VR Little Endian
  data set that inflates past ``max_inflated_bytes`` (inflated as it arrives, into a bounded
  buffer that is thrown away), and a DIMSE message whose data set does not follow its command
  within the DIMSE timeout: the node sends A-ABORT (service-provider, PS3.8 section 9.3.8) and
  closes the connection. Memory per connection is bounded by these settings, not by the sender.
* **Unknown storage SOP classes** (:meth:`NodeAssociation._serve_request`): a C-STORE on a
  context accepted for a class pynetdicom does not know is served by the storage service.

Every refusal is counted by reason (:attr:`FrontDoor.refusals`) and logged with its reason,
at most once per reason and address every ``REFUSAL_LOG_INTERVAL_S`` (later ones are summed
into the next line).
"""

from __future__ import annotations

import gc
import logging
import socket
import ssl
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, cast

from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node.settings import NetworkSettings
from dicom_node.sop_classes import is_unknown_storage_class
from dicom_node.tls import handshake_failure

log = logging.getLogger(__name__)

REFUSAL_LOG_INTERVAL_S = 10.0
"""At most one log line per refusal reason and source address in this many seconds."""
UNLIMITED_PDU_CAP = 64 * 1024 * 1024
"""P-DATA-TF cap when ``max_pdu`` is 0 (no maximum advertised)."""
GC_INTERVAL_S = 30.0
"""pynetdicom's server runs a full ``gc.collect()`` every 60 accepted connections; in the node's
process one takes about 0.3 s holding the GIL, so a connection flood would turn it into a
denial of service. The node collects at most this often instead."""
PENDING_POLL_S = 0.02
"""How often the DUL of a connection not yet associated looks at its socket (pynetdicom: 1 ms);
a flood of silent sockets then costs little CPU, and a request waits at most this long."""
MAX_COMMAND_BYTES = 65_536
"""A DIMSE command set is a few hundred bytes (PS3.7 section 9.3); more is not a command."""
_INFLATE_CHUNK = 1024 * 1024
_PDU_HEADER = 6
_P_DATA_TF = 0x04
_A_ASSOCIATE_RQ = 0x01
# A-ABORT PDU (PS3.8 section 9.3.8): source 2 (service-provider), reason 6 (invalid PDU parameter value).
_ABORT_INVALID_PARAMETER = bytes((0x07, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x02, 0x06))
# source 0 (service-user): the node gives up waiting for a data set (as for any DIMSE timeout).
_ABORT_SERVICE_USER = bytes((0x07, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00))
_NO_DATA_SET = 0x0101  # Command Data Set Type (0000,0800): no data set follows (PS3.7 E.1)


class Refusal(str, Enum):
    """Why the front door refused a connection, an association or a message (counter keys)."""

    RATE = "connection_rate"
    PENDING_PER_ADDRESS = "pending_per_address"
    PENDING_TOTAL = "pending_total"
    ASSOCIATE_RQ_TIMEOUT = "associate_rq_timeout"
    ASSOCIATE_RQ_TOO_LARGE = "associate_rq_too_large"
    PDU_TOO_LARGE = "pdu_too_large"
    COMMAND_TOO_LARGE = "command_too_large"
    DATASET_TOO_LARGE = "dataset_too_large"
    INFLATED_TOO_LARGE = "inflated_too_large"
    DIMSE_TIMEOUT = "dimse_timeout"
    PDU_STALLED = "pdu_stalled"
    CALLED_AE = "called_ae"
    CALLING_AE = "calling_ae"
    REGISTRY_UNAVAILABLE = "registry_unavailable"
    ASSOCIATION_LIMIT = "association_limit"
    PEER_LIMIT = "peer_limit"
    UNKNOWN_SOP_CLASS = "unknown_sop_class"
    TLS_HANDSHAKE = "tls_handshake"
    TLS_CERTIFICATE = "tls_certificate"
    TLS_NO_CERTIFICATE = "tls_no_certificate"
    TLS_NOT_TLS = "tls_not_tls"
    TLS_TIMEOUT = "tls_timeout"
    TLS_REQUIRED = "tls_required"


_HANDSHAKE_REFUSALS = {
    "certificate": Refusal.TLS_CERTIFICATE,
    "no_certificate": Refusal.TLS_NO_CERTIFICATE,
    "not_tls": Refusal.TLS_NOT_TLS,
    "timeout": Refusal.TLS_TIMEOUT,
    "handshake": Refusal.TLS_HANDSHAKE,
}


class RefusalLog:
    """Counts refusals by reason and logs them, rate-limited per reason and source address."""

    def __init__(self, interval_s: float | None = None) -> None:
        self.counts: Counter[str] = Counter()
        self._interval_s = REFUSAL_LOG_INTERVAL_S if interval_s is None else interval_s
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def record(self, reason: Refusal, address: str, detail: str) -> None:
        """Count one refusal; log it unless this reason and address were logged just now."""
        now = time.monotonic()
        key = (reason.value, address)
        with self._lock:
            self.counts[reason.value] += 1
            last = self._last.get(key)
            if last is not None and now - last[0] < self._interval_s:
                self._last[key] = (last[0], last[1] + 1)
                return
            suppressed = 0 if last is None else last[1]
            if len(self._last) > 4096:  # forget old keys so a scan of many addresses stays bounded
                self._last = {k: v for k, v in self._last.items() if now - v[0] < self._interval_s}
            self._last[key] = (now, 0)
        more = f" ({suppressed} more from this address since the last line)" if suppressed else ""
        log.warning("refused (%s) from %s: %s%s", reason.value, address, detail, more)


@dataclass
class _Bucket:
    tokens: float
    at: float


class ConnectionRate:
    """Token buckets of new connections per source address."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._buckets: dict[str, _Bucket] = {}

    def take(self, address: str, now: float) -> bool:
        """Take a token for ``address`` (caller holds the lock); False when none is left."""
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) > 10_000:  # drop full buckets: they hold no state worth keeping
                self._buckets = {a: b for a, b in self._buckets.items() if self._level(b, now) < self._burst}
            bucket = self._buckets[address] = _Bucket(self._burst, now)
        bucket.tokens, bucket.at = self._level(bucket, now), now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _level(self, bucket: _Bucket, now: float) -> float:
        return min(self._burst, bucket.tokens + (now - bucket.at) * self._rate)


@dataclass
class Connection:
    """One admitted TCP connection, from accept until its association thread ends."""

    door: FrontDoor
    address: str
    accepted_at: float = field(default_factory=time.monotonic)
    pending: bool = True
    peer_key: str | None = None
    closed: bool = False
    tls: bool = False
    """True when the connection came through the TLS listener and its handshake succeeded."""
    tls_peer: str | None = None
    """The client certificate's subject (RFC 4514 text) when one was presented and verified."""

    def request_received(self) -> None:
        """The A-ASSOCIATE-RQ has been read whole: no longer a pending connection."""
        self.door._request_received(self)

    def close(self) -> None:
        """The connection ended (idempotent): release its pending or association slot."""
        self.door._closed(self)


class FrontDoor:
    """Admission state and limits shared by every connection of the node's listeners (plain and TLS)."""

    def __init__(self, settings: NetworkSettings) -> None:
        self.settings = settings
        self.refusals = RefusalLog()
        self._lock = threading.Lock()
        self._rate = ConnectionRate(settings.connection_rate_per_address, settings.connection_burst_per_address)
        self._pending: Counter[str] = Counter()
        self._associations: Counter[str] = Counter()
        self._association_total = 0

    @property
    def counts(self) -> Counter[str]:
        """Refusals so far, by :class:`Refusal` value."""
        return self.refusals.counts

    @property
    def pending(self) -> int:
        """Connections admitted that have not yet sent their A-ASSOCIATE-RQ."""
        with self._lock:
            return sum(self._pending.values())

    @property
    def associations(self) -> int:
        """Associations holding a slot (negotiating or established)."""
        with self._lock:
            return self._association_total

    @property
    def pdu_limit(self) -> int:
        """Largest P-DATA-TF PDU length field accepted (the advertised maximum, PS3.8 D.1)."""
        # Tolerate senders that count the 6-byte PDU header in the advertised maximum.
        return (self.settings.max_pdu or UNLIMITED_PDU_CAP) + _PDU_HEADER

    def admit_connection(self, address: str) -> Connection | None:
        """A new TCP connection from ``address``: a pending :class:`Connection`, or None (refused)."""
        now = time.monotonic()
        refusal: tuple[Refusal, str] | None = None
        with self._lock:
            if not self._rate.take(address, now):
                refusal = (Refusal.RATE, f"more than {self.settings.connection_burst_per_address} new connections at once")
            elif self._pending[address] >= self.settings.max_pending_per_address:
                refusal = (Refusal.PENDING_PER_ADDRESS, f"{self._pending[address]} connections not yet associated")
            elif sum(self._pending.values()) >= self.settings.max_pending_connections:
                refusal = (Refusal.PENDING_TOTAL, f"{self.settings.max_pending_connections} connections not yet associated")
            else:
                self._pending[address] += 1
                return Connection(self, address)
        self.refusals.record(refusal[0], address, f"connection closed: {refusal[1]}")
        return None

    def admit_association(self, connection: Connection, peer_key: str) -> tuple[Refusal, str] | None:
        """Take an association slot for ``peer_key``; the refusal and its reason if none is free."""
        with self._lock:
            if connection.peer_key is not None or connection.closed:
                return None
            if self._association_total >= self.settings.max_associations:
                return Refusal.ASSOCIATION_LIMIT, f"{self._association_total} associations open (max_associations)"
            if self._associations[peer_key] >= self.settings.max_associations_per_peer:
                return Refusal.PEER_LIMIT, (
                    f"peer {peer_key} holds {self._associations[peer_key]} associations (max_associations_per_peer)"
                )
            connection.peer_key = peer_key
            self._associations[peer_key] += 1
            self._association_total += 1
            return None

    def _request_received(self, connection: Connection) -> None:
        with self._lock:
            if connection.pending:
                connection.pending = False
                self._release_pending(connection.address)

    def _closed(self, connection: Connection) -> None:
        with self._lock:
            if connection.closed:
                return
            connection.closed = True
            if connection.pending:
                connection.pending = False
                self._release_pending(connection.address)
            if connection.peer_key is not None:
                self._associations[connection.peer_key] -= 1
                if self._associations[connection.peer_key] <= 0:
                    del self._associations[connection.peer_key]
                self._association_total -= 1

    def _release_pending(self, address: str) -> None:
        self._pending[address] -= 1
        if self._pending[address] <= 0:
            del self._pending[address]


class _BoundedInflater:
    """Inflates a raw deflate stream (PS3.5 A.5) in bounded chunks, counting and discarding output."""

    def __init__(self, limit: int) -> None:
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._limit = limit
        self.total = 0
        self.broken = False

    def feed(self, data: bytes | memoryview) -> bool:
        """Inflate ``data``; False once the output exceeds the limit."""
        if self.broken:
            return True
        pending: bytes | memoryview = data
        try:
            while pending:
                self.total += len(self._inflater.decompress(pending, _INFLATE_CHUNK))
                if self.total > self._limit:
                    return False
                pending = self._inflater.unconsumed_tail
        except zlib.error:
            self.broken = True  # not deflate: the header parser refuses it with a status
        return True


def _command_has_data_set(command: bytes) -> bool:
    """Whether a command set (Implicit VR Little Endian, PS3.7 6.3.1) announces a data set."""
    offset = 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHL", command, offset)
        if (group, element) == (0x0000, 0x0800) and length >= 2:
            return int(struct.unpack_from("<H", command, offset + 8)[0]) != _NO_DATA_SET
        offset += 8 + length
    return False


class GuardedSocket(AssociationSocket):
    """An :class:`AssociationSocket` that enforces the node's PDU and message limits.

    pynetdicom's DUL reads each PDU as ``recv(6)`` (type and length) then ``recv(length)``;
    the limits are checked between the two, so an oversized PDU is never read, and P-DATA-TF
    bodies are inspected (PDV headers, PS3.8 section 9.3.5) before they are handed on.
    """

    def __init__(self, assoc: Association, client_socket: socket.socket, connection: Connection) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self.connection = connection
        self._door = connection.door
        self._settings = connection.door.settings
        self._header: tuple[int, int] | None = None
        self._command = bytearray()
        self._data_set_bytes = 0
        self._data_set_deadline: float | None = None
        self._inflater: _BoundedInflater | None = None
        self.refused = False
        self._associated_poll_s = 0.001
        """True once this socket refused something (counted and logged)."""

    # -- reading ------------------------------------------------------------------------
    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (a PDU header or body); short on a limit, a deadline or a closed peer."""
        if self.refused:
            return bytearray()
        header = self._header
        if header is None and nr_bytes == _PDU_HEADER:
            data = self._read(nr_bytes)
            if len(data) == _PDU_HEADER:
                pdu_type, _, length = struct.unpack(">BBL", data)
                self._header = (pdu_type, length)
                refusal = self._check_length(pdu_type, length)
                if refusal is not None:
                    self._refuse(*refusal)
                    return bytearray()
            return data
        self._header = None
        data = self._read(nr_bytes)
        if header is None or len(data) != nr_bytes:
            return data
        if header[0] == _A_ASSOCIATE_RQ and self.connection.pending:
            self.connection.request_received()
            self.assoc.acse_timeout = self._settings.acse_timeout_s
            self.assoc.dul._run_loop_delay = self._associated_poll_s
        elif header[0] == _P_DATA_TF:
            refusal = self._inspect_p_data(data)
            if refusal is not None:
                self._refuse(*refusal)
                return bytearray()
        return data

    def _read(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        data = bytearray()
        while len(data) < nr_bytes:
            timeout = self._read_timeout()
            if timeout <= 0:
                self._refuse(Refusal.ASSOCIATE_RQ_TIMEOUT, "A-ASSOCIATE-RQ not received in time", abort=False)
                return data
            try:
                sock.settimeout(timeout)
                chunk = sock.recv(min(nr_bytes - len(data), 65_536))
            except (TimeoutError, socket.timeout):
                if self.connection.pending:
                    continue  # the request deadline is checked again above
                # Stalled in the middle of a PDU for the idle timeout: pynetdicom's own idle
                # timer cannot end an association whose DUL thread is blocked here.
                self._refuse(Refusal.PDU_STALLED, f"no byte for {timeout} s inside a PDU", abort=False)
                return data
            except OSError:
                chunk = b""
            if not chunk:
                # The peer closed: a connection that never associated gives its slot back now,
                # not when pynetdicom's ACSE timer ends its thread.
                if self.connection.pending:
                    self.connection.close()
                return data
            data.extend(chunk)
        return data

    def _read_timeout(self) -> float:
        if self.connection.pending:
            return self.connection.accepted_at + self._settings.associate_rq_timeout_s - time.monotonic()
        return self._settings.network_timeout_s

    def _check_length(self, pdu_type: int, length: int) -> tuple[Refusal, str] | None:
        if pdu_type == _P_DATA_TF:
            if length > self._door.pdu_limit:
                return Refusal.PDU_TOO_LARGE, f"P-DATA-TF of {length} bytes over the advertised maximum"
            return None
        if length > self._settings.max_associate_rq_bytes:
            reason = Refusal.ASSOCIATE_RQ_TOO_LARGE if pdu_type == _A_ASSOCIATE_RQ else Refusal.PDU_TOO_LARGE
            return reason, f"PDU type 0x{pdu_type:02X} of {length} bytes over max_associate_rq_bytes"
        return None

    def _inspect_p_data(self, body: bytearray) -> tuple[Refusal, str] | None:
        view = memoryview(body)
        offset = 0
        while offset + 6 <= len(body):
            (item_length,) = struct.unpack_from(">L", body, offset)
            context_id, control = body[offset + 4], body[offset + 5]
            fragment = view[offset + 6 : offset + 4 + item_length]
            offset += 4 + item_length
            last = bool(control & 0x02)
            if control & 0x01:
                refusal = self._command_fragment(fragment, last, context_id)
            else:
                refusal = self._data_set_fragment(fragment, last)
            if refusal is not None:
                return refusal
        return None

    def _command_fragment(self, fragment: memoryview, last: bool, context_id: int) -> tuple[Refusal, str] | None:
        self._command.extend(fragment)
        if len(self._command) > MAX_COMMAND_BYTES:
            return Refusal.COMMAND_TOO_LARGE, f"DIMSE command set over {MAX_COMMAND_BYTES} bytes"
        if last:
            announces = _command_has_data_set(bytes(self._command))
            self._command.clear()
            self._data_set_bytes = 0
            self._inflater = None
            self._data_set_deadline = None
            if announces:
                self._data_set_deadline = time.monotonic() + self._settings.dimse_timeout_s
                if self._is_deflated(context_id):
                    self._inflater = _BoundedInflater(self._settings.max_inflated_bytes)
        return None

    def _data_set_fragment(self, fragment: memoryview, last: bool) -> tuple[Refusal, str] | None:
        self._data_set_bytes += len(fragment)
        if self._data_set_bytes > self._settings.max_dataset_bytes:
            return Refusal.DATASET_TOO_LARGE, f"data set over max_dataset_bytes ({self._settings.max_dataset_bytes})"
        if self._inflater is not None and not self._inflater.feed(fragment):
            return Refusal.INFLATED_TOO_LARGE, (
                f"deflated data set expands past max_inflated_bytes ({self._settings.max_inflated_bytes})"
            )
        if last:
            self._data_set_deadline, self._inflater = None, None
        else:
            self._data_set_deadline = time.monotonic() + self._settings.dimse_timeout_s
        return None

    def _is_deflated(self, context_id: int) -> bool:
        context = self.assoc._accepted_cx.get(context_id)
        return context is not None and str(context.transfer_syntax[0]) == DeflatedExplicitVRLittleEndian

    @property
    def ready(self) -> bool:
        """Data waiting to be read; a data set overdue past the DIMSE timeout aborts instead."""
        deadline = self._data_set_deadline
        if deadline is not None and time.monotonic() > deadline and not self.refused:
            self._refuse(
                Refusal.DIMSE_TIMEOUT,
                f"no data set within the DIMSE timeout ({self._settings.dimse_timeout_s} s) of its command",
                abort_pdu=_ABORT_SERVICE_USER,
            )
            self.event_queue.put("Evt17")  # transport closed: the state machine ends the association
            return False
        return super().ready

    # -- refusing -----------------------------------------------------------------------
    def _refuse(self, reason: Refusal, detail: str, *, abort: bool = True, abort_pdu: bytes = _ABORT_INVALID_PARAMETER) -> None:
        """Count and log, send A-ABORT (unless ``abort`` is False), close the connection."""
        if self.refused:
            return
        self.refused = True
        self._data_set_deadline = None
        action = "aborted" if abort else "closed"
        self._door.refusals.record(reason, self.connection.address, f"{detail}; connection {action}")
        sock = cast(socket.socket, self.socket)
        try:
            if abort:
                sock.settimeout(1.0)
                sock.sendall(abort_pdu)
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class NodeAssociation(Association):
    """An acceptor association that releases its front-door slot when its thread ends."""

    connection: Connection

    def run_reactor(self) -> None:
        """Run pynetdicom's reactor; always release the connection's slot afterwards."""
        try:
            super().run_reactor()
        finally:
            connection = self.connection
            sock = self.dul.socket
            waited = time.monotonic() - connection.accepted_at
            if connection.pending and isinstance(sock, GuardedSocket) and not sock.refused:
                if waited >= connection.door.settings.associate_rq_timeout_s:
                    connection.door.refusals.record(
                        Refusal.ASSOCIATE_RQ_TIMEOUT, connection.address, "no A-ASSOCIATE-RQ in time; connection closed"
                    )
                else:
                    log.debug("connection from %s closed by the peer before an A-ASSOCIATE-RQ", connection.address)
            connection.close()

    def _serve_request(self, msg: Any, context_id: int) -> None:
        """Serve a C-STORE of an accepted unknown storage class with the storage service.

        pynetdicom finds no service class for a SOP class it does not know and aborts; the
        node accepted the context on purpose (:mod:`dicom_node.sop_classes`).
        """
        context = self._accepted_cx.get(context_id)
        if (
            isinstance(msg, C_STORE)
            and msg.is_valid_request
            and not self._sent_release
            and context is not None
            and is_unknown_storage_class(str(context.abstract_syntax))
        ):
            self.dimse.cancel_req = {}
            self._is_paused = True
            try:
                StorageServiceClass(self).SCP(msg, context)
            except Exception:
                log.exception("storage of an unknown SOP class failed; association aborted")
                self.abort()
            finally:
                self._is_paused = False
            return
        super()._serve_request(msg, context_id)


def _certificate_subject(sock: ssl.SSLSocket) -> str | None:
    """The verified client certificate's subject as ``CN=...,O=...`` (None when none was sent)."""
    certificate = sock.getpeercert()
    if not certificate:
        return None
    subject = cast(tuple[tuple[tuple[str, str], ...], ...], certificate.get("subject", ()))
    return ",".join(f"{key}={value}" for rdn in subject for key, value in rdn) or None


class NodeRequestHandler(RequestHandler):
    """Creates a :class:`NodeAssociation` on a :class:`GuardedSocket` for each admitted connection."""

    server: NodeAssociationServer
    _connection: Connection

    def handle(self) -> None:
        """Take the admitted connection, complete its TLS handshake (TLS listener), then associate."""
        self._connection = self.server.take_connection(self.request)
        if self.server.tls_context is not None and not self._tls_handshake():
            return
        super().handle()

    def _tls_handshake(self) -> bool:
        """Server-side TLS handshake within ``associate_rq_timeout_s`` of the accept (PS3.15 B).

        On success ``self.request`` becomes the TLS socket; on failure the refusal is counted and
        logged with its reason, the connection closed and its slot released.
        """
        connection = self._connection
        context = cast(ssl.SSLContext, self.server.tls_context)
        raw = cast(socket.socket, self.request)
        remaining = connection.accepted_at + self.server.door.settings.associate_rq_timeout_s - time.monotonic()
        tls_socket: ssl.SSLSocket | None = None
        try:
            # CPython bounds the whole do_handshake by one deadline from this timeout (not per
            # read), so a client dripping its ClientHello byte by byte is cut off in time too.
            raw.settimeout(max(remaining, 0.001))
            tls_socket = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            tls_socket.do_handshake()
        except (OSError, ValueError) as exc:
            kind, why = handshake_failure(exc)
            self.server.door.refusals.record(
                _HANDSHAKE_REFUSALS[kind], connection.address, f"TLS handshake failed: {why}; connection closed"
            )
            connection.close()  # the slot first: the peer sees the close after it is free again
            for sock in (tls_socket, raw):
                if sock is not None:
                    try:
                        sock.close()
                    except OSError:
                        pass
            return False
        connection.tls = True
        connection.tls_peer = _certificate_subject(tls_socket)
        log.debug(
            "TLS from %s: %s %s, client certificate %s",
            connection.address, tls_socket.version(), (tls_socket.cipher() or ("?",))[0], connection.tls_peer or "none",
        )
        self.request = tls_socket
        return True

    def _create_association(self) -> Association:
        """As pynetdicom's own, with the node's association and socket classes (pynetdicom 2.x/3.x)."""
        connection = self._connection
        assoc = NodeAssociation(self.ae, MODE_ACCEPTOR)
        assoc.connection = connection
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        # Until the A-ASSOCIATE-RQ is read the ACSE (and ARTIM) timer runs on the short deadline.
        assoc.acse_timeout = self.server.door.settings.associate_rq_timeout_s
        sock = GuardedSocket(assoc, cast(socket.socket, self.request), connection)
        sock._associated_poll_s = assoc.dul._run_loop_delay
        assoc.dul._run_loop_delay = PENDING_POLL_S
        assoc.set_socket(sock)
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        # pynetdicom deep-copies its ~170 supported contexts here (60 ms of GIL per connection,
        # which made a connect/close flood a denial of service); negotiation only reads them
        # and the node replaces the list rather than changing it (scp.add_unknown_storage_contexts).
        assoc.acceptor.supported_contexts = list(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *cast(tuple[Callable[..., Any], Any], handlers))
            elif isinstance(event, evt.NotificationEvent):
                for handler in cast(list[tuple[Callable[..., Any], Any]], handlers):
                    assoc.bind(event, handler[0], handler[1])
        return assoc


class NodeAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the node's admission control before every thread."""

    door: FrontDoor
    request_queue_size = 256
    """listen() backlog: socketserver's default of 5 drops a legitimate SYN behind a burst."""

    def __init__(self, *args: Any, door: FrontDoor, tls_context: ssl.SSLContext | None = None, **kwargs: Any) -> None:
        self.door = door
        self.tls_context = tls_context
        """The TLS listener's context; the handshake runs in :meth:`NodeRequestHandler.handle`."""
        self._admitted: dict[int, Connection] = {}
        self._admitted_lock = threading.Lock()
        self._collected_at = time.monotonic()
        kwargs["request_handler"] = NodeRequestHandler
        super().__init__(*args, **kwargs)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit or refuse a connection before a thread is started for it (socketserver hook)."""
        connection = self.door.admit_connection(str(client_address[0]))
        if connection is None:
            return False  # socketserver closes it
        with self._admitted_lock:
            self._admitted[id(request)] = connection
        return True

    def service_actions(self) -> None:
        """socketserver's per-loop hook: a full garbage collection at most every ``GC_INTERVAL_S``."""
        now = time.monotonic()
        if now - self._collected_at >= GC_INTERVAL_S:
            self._collected_at = now
            gc.collect()

    def take_connection(self, request: Any) -> Connection:
        """The admitted :class:`Connection` of ``request`` (handed to its association once)."""
        with self._admitted_lock:
            return self._admitted.pop(id(request))

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Run the request handler; release the slot if no association took it."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._admitted_lock:
                orphan = self._admitted.pop(id(request), None)
            if orphan is not None:
                orphan.close()
                self.shutdown_request(request)

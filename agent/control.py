"""The agent's local control socket: ``permitgate sim`` today, landlord enrollment next.

A Unix datagram socket next to the database (``sim.sock``, mode 0600: only the agent's
own user can write to it). One request is one JSON object in one datagram of at most
``MAX_DATAGRAM`` bytes, UTF-8::

    {"op": "tap", "reader": "front-in", "card": "em4100:67003B51C6"}
    {"op": "input", "name": "front.contact", "active": true}

A client that bound its own socket (``permitgate sim`` binds an abstract address) gets one
reply datagram; an unbound sender is served without one::

    {"ok": true, "op": "tap", "reader": "front-in", "granted": false, "reason": "unknown_card"}
    {"ok": true, "op": "input", "name": "front.contact", "active": true}
    {"ok": false, "error": "busy", "message": "..."}

Error codes: ``too_large``, ``malformed`` (not UTF-8 JSON, or nested too deeply),
``bad_request`` (a missing, unknown or mistyped field), ``unknown_op``,
``unknown_reader``, ``unknown_input``, ``busy``, ``no_decision`` and ``internal``. A
message names the field that was wrong, never a value the client sent: a card id typed
into the wrong field must not reach the logs.

The server sees the agent only through ``ControlTarget``, which the runtime implements; a
new request type is a model in ``REQUEST_TYPES``, a handler in ``ControlServer._handlers``
and, if it needs the agent, a method on ``ControlTarget``.

A tap is answered with the decision it led to. Taps travel the way a card does: into the
simulated reader's queue, out through the reader thread (its debounce included) into the
card path, which tells the server about each decision (``ControlServer.decided``). Since
a reader thread takes its queue in order and finishes each read before the next, the taps
this server queued that have left the queue when a decision arrives are a prefix of those
it sent: the last of them is the one decided, any before it were dropped as repeats. This
holds while the socket is the only producer for a simulated reader's queue, as in a
running agent; a decision on a read queued by someone else is not answered to anybody.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import structlog
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from agent.config import Config

log = structlog.get_logger()

MAX_DATAGRAM = 1024
"""Bytes in one request; a tap is under 250. Longer datagrams are refused whole."""
MAX_DEPTH = 4
"""Nesting of JSON arrays and objects in a request (requests today are flat: depth 1).
Checked by a linear scan before ``json.loads``, whose recursion a few thousand ``[``
would exhaust."""
MAX_REPLY = 256 * 1024
"""The largest reply a client reads (a tenant list of a few thousand rows)."""
MAX_QUEUED_TAPS = 8
"""Taps waiting at one simulated reader; more are refused as ``busy``."""
TAP_REPLY_TIMEOUT_S = 3.0
"""A tap not decided this long after it was queued is answered ``no_decision`` (the
reader thread normally takes it within 0.2 s and decides in about a millisecond)."""
CLIENT_TIMEOUT_S = TAP_REPLY_TIMEOUT_S + 2.0
"""How long ``request`` waits for the reply: past the server's own timeout."""
RECV_TIMEOUT_S = 0.2
"""How often the server loop looks at its stop flag and at taps waiting too long."""
MAX_CARD_CHARS = 161
CARD_PATTERN = r"[a-z0-9][a-z0-9_-]{0,31}:[!-~]{1,128}"
"""A normalised card id, ``<kind>:<id>`` (as ``protocol.ids.CARD_PATTERN``, but the id
is printable ASCII only): the kind as readers report it, the id without spaces."""
_CARD_RE = re.compile(CARD_PATTERN)

Address = str | bytes | None
"""A datagram sender's address: a path, an abstract name (bytes) or None (unbound)."""
Handler = Callable[[Any, Address], dict[str, Any] | None]
"""Answers one request: the reply, or None when it comes later."""


class ControlTarget(Protocol):
    """What the control socket may ask of the agent. The runtime implements it; the
    server knows nothing else of the agent."""

    def sim_readers(self) -> Collection[str]:
        """Ids of the readers whose cards come from simulated taps."""
        ...

    def sim_inputs(self) -> Collection[str]:
        """Names of the simulated inputs (``<door>.contact``, ``<door>.rex``,
        ``<reader>.tamper``)."""
        ...

    def sim_queued(self, reader: str) -> int:
        """Taps waiting in ``reader``'s queue."""
        ...

    def sim_tap(self, reader: str, card: str) -> None:
        """Queue ``card`` at the simulated ``reader``."""
        ...

    def sim_set_input(self, name: str, active: bool) -> None:
        """Set the simulated input ``name``."""
        ...


class _NoSimulation:
    """The target of a socket that serves no simulation requests (``web.sock``)."""

    def sim_readers(self) -> Collection[str]:
        return ()

    def sim_inputs(self) -> Collection[str]:
        return ()

    def sim_queued(self, reader: str) -> int:
        return 0

    def sim_tap(self, reader: str, card: str) -> None:
        raise RequestError("unknown_op", "this socket serves no simulated taps")

    def sim_set_input(self, name: str, active: bool) -> None:
        raise RequestError("unknown_op", "this socket serves no simulated inputs")


def simulated_readers(config: Config) -> frozenset[str]:
    """Ids of the configured readers with the ``simulated`` driver."""
    return frozenset(r.id for r in config.readers if r.driver == "simulated")


def simulated_inputs(config: Config) -> frozenset[str]:
    """Names ``permitgate sim input`` may set: simulated door contacts and exit buttons,
    and the tamper switch of each simulated reader."""
    doors = {f"{door.id}.{what}" for door in config.doors
             for what, dev in (("contact", door.contact), ("rex", door.rex))
             if dev is not None and dev.driver == "simulated"}
    return frozenset(doors | {f"{r}.tamper" for r in simulated_readers(config)})


def card_problem(card: str) -> str | None:
    """Why ``card`` is not a normalised card id, without repeating it; None if it is."""
    if len(card) > MAX_CARD_CHARS:
        return f"longer than {MAX_CARD_CHARS} characters"
    if not _CARD_RE.fullmatch(card):
        return ("not a normalised card id: a kind, a colon and the id in printable ASCII "
                "without spaces, e.g. em4100:0A1B2C3D4E")
    return None


# -- requests ------------------------------------------------------------------------------


class RequestError(Exception):
    """A request refused; ``code`` is the reply's ``error``, the message says what was
    wrong without repeating what the client sent."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Request(BaseModel):
    # strict: "false" is not a boolean and 1 is not a string.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


ReaderId = Annotated[str, StringConstraints(min_length=1, max_length=63)]
InputName = Annotated[str, StringConstraints(min_length=1, max_length=127)]
CardId = Annotated[str, StringConstraints(min_length=3, max_length=MAX_CARD_CHARS)]


class TapRequest(_Request):
    """Present a card at a simulated reader; answered with the decision."""

    op: Literal["tap"]
    reader: ReaderId
    card: CardId


class InputRequest(_Request):
    """Set a simulated input (door contact, exit button, reader tamper)."""

    op: Literal["input"]
    name: InputName
    active: bool


Request = TapRequest | InputRequest

REQUEST_TYPES: dict[str, type[_Request]] = {"tap": TapRequest, "input": InputRequest}
"""Every request the socket accepts, by ``op``."""


def too_deep(data: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON ``data`` nests arrays or objects more than ``limit`` deep: one linear
    pass that skips strings, so it cannot recurse or be fooled by brackets in values."""
    depth = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            if depth > limit:
                return True
        elif byte in b"]}":
            depth -= 1
    return False


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise RequestError("bad_request", "a field is given twice")
    return dict(pairs)


def _no_constant(_name: str) -> Any:
    raise RequestError("malformed", "NaN and Infinity are not JSON")


def parse_request(data: bytes, *, truncated: bool = False,
                  types: Mapping[str, type[_Request]] = REQUEST_TYPES) -> _Request:
    """The request in one datagram, checked in full against the models in ``types`` (by
    ``op``); ``RequestError`` otherwise.

    ``truncated``: the datagram was longer than the buffer it was read into.
    """
    if truncated or len(data) > MAX_DATAGRAM:
        raise RequestError("too_large", f"a request is at most {MAX_DATAGRAM} bytes")
    if too_deep(data):
        raise RequestError("malformed", f"JSON nested more than {MAX_DEPTH} levels deep")
    try:
        raw = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise RequestError("malformed", "not UTF-8") from None
    except RecursionError:  # too_deep makes this unreachable; kept as a second wall
        raise RequestError("malformed", "JSON nested too deeply") from None
    except ValueError:
        # JSONDecodeError's message quotes no input, but a position is no help either.
        raise RequestError("malformed", "not a JSON document") from None
    if not isinstance(raw, dict):
        raise RequestError("bad_request", "a request is a JSON object")
    if "op" not in raw:
        raise RequestError("bad_request", f"op: missing (one of: {', '.join(sorted(types))})")
    op = raw["op"]
    model = types.get(op) if isinstance(op, str) else None
    if model is None:
        raise RequestError("unknown_op", f"op: unknown (one of: {', '.join(sorted(types))})")
    try:
        request = model.model_validate(raw)
    except ValidationError as exc:
        raise RequestError("bad_request", _describe(exc, model)) from None
    if isinstance(request, TapRequest):
        problem = card_problem(request.card)
        if problem is not None:
            raise RequestError("bad_request", f"card: {problem}")
    return request


def _describe(error: ValidationError, model: type[_Request]) -> str:
    """What was wrong, by field name, never with the value sent (pydantic's messages name
    types and limits, not inputs; an unknown field is not named at all, as a card id
    could be sent as a field name)."""
    fields = ", ".join(model.model_fields)
    problems: list[str] = []
    for item in error.errors(include_input=False, include_url=False):
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown field (accepted: {fields})")
        elif item["type"] == "missing":
            problems.append(f"{item['loc'][0]}: missing")
        else:
            problems.append(f"{item['loc'][0]}: {item['msg']}")
    return "; ".join(dict.fromkeys(problems))


# -- the server ----------------------------------------------------------------------------


class ControlSocketError(OSError):
    """The control socket cannot be set up; the message names the path."""


@dataclass(slots=True)
class _Tap:
    """A tap this server queued, waiting for its decision."""

    sender: Address
    at: float
    answered: bool = False


class ControlServer:
    """Serves the control socket at ``path`` for ``target``.

    ``bind()`` creates the socket, ``serve(stopping)`` answers requests until ``stopping``
    is set and then closes it; ``decided()`` is called from the card path after every
    decision. ``close()`` removes the socket file only if it is still the one bound here.
    """

    def __init__(self, path: Path, target: ControlTarget | None, *,
                 extra: Mapping[str, tuple[type[_Request], Handler]] | None = None,
                 mode: int = 0o600, group: int | None = None,
                 max_queued_taps: int = MAX_QUEUED_TAPS,
                 tap_timeout_s: float = TAP_REPLY_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._target: ControlTarget = target if target is not None else _NoSimulation()
        self._max_queued = max_queued_taps
        self._tap_timeout = tap_timeout_s
        self._clock = clock
        self._sock: socket.socket | None = None
        self._bound: tuple[int, int] | None = None
        """(st_dev, st_ino) of the socket file this server bound."""
        self._lock = threading.Lock()
        self._taps: dict[str, deque[_Tap]] = {}
        self._mode = mode
        self._group = group
        self._types: dict[str, type[_Request]] = {}
        self._handlers: dict[type[_Request], Handler] = {}
        if target is not None:  # the simulation's requests
            self._types.update(REQUEST_TYPES)
            self._handlers.update({TapRequest: self._tap, InputRequest: self._input})
        for op, (model, handler) in (extra or {}).items():
            self._types[op] = model
            self._handlers[model] = handler

    @property
    def bound_socket(self) -> socket.socket | None:
        """The bound socket, until closed."""
        return self._sock

    # -- socket file -----------------------------------------------------------------------

    def bind(self) -> None:
        """Create the socket at ``path``, mode 0600 from the start.

        A socket file no process is bound to (an agent that was killed) is replaced;
        a live socket or anything that is not a socket is left alone and refused.
        """
        path = self.path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            # Linux creates the socket file with the socket inode's mode (less the umask):
            # set it before bind() so the file is never writable by others, not even for
            # the moment between bind() and a chmod().
            os.fchmod(sock.fileno(), self._mode)
            self._clear_stale(path)
            sock.bind(str(path))
            st = path.lstat()
            self._bound = (st.st_dev, st.st_ino)
            if self._group is not None:
                # The landlord page's own user writes here through its group (web.sock).
                os.chown(path, -1, self._group)
            path.chmod(self._mode)  # a no-op where fchmod took effect
        except ControlSocketError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise ControlSocketError(f"{path}: cannot create the control socket: "
                                     f"{exc.strerror or exc}") from exc
        sock.settimeout(RECV_TIMEOUT_S)
        self._sock = sock
        log.info("control_socket_ready", path=str(path))

    @staticmethod
    def _clear_stale(path: Path) -> None:
        try:
            st = path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketError(f"{path}: exists and is not a socket; move it away "
                                     "and start again")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect(str(path))
            except ConnectionRefusedError:
                pass  # nobody bound: left by an agent that did not stop cleanly
            else:
                raise ControlSocketError(f"{path}: another process is serving this "
                                         "socket (is an agent already running here?)")
        path.unlink(missing_ok=True)
        log.info("control_socket_stale_removed", path=str(path))

    def close(self) -> None:
        """Close the socket; remove its file if it is still the one this server bound
        (same device and inode), never one another process has bound since."""
        with self._lock:
            sock, self._sock = self._sock, None
            bound, self._bound = self._bound, None
        if sock is not None:
            sock.close()
        if bound is None:
            return
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("control_socket_not_removed", path=str(self.path),
                        error=exc.strerror)
            return
        if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == bound:
            self.path.unlink(missing_ok=True)
        else:
            log.info("control_socket_not_removed", path=str(self.path),
                     reason="replaced by another process")

    # -- the loop --------------------------------------------------------------------------

    def serve(self, stopping: threading.Event) -> None:
        """Answer requests until ``stopping`` is set, then close. No datagram ends it:
        every iteration is a broad-except boundary."""
        try:
            while not stopping.is_set():
                sock = self._sock
                if sock is None:
                    return
                try:
                    self._serve_one(sock)
                except Exception as exc:  # noqa: BLE001 - each datagram's one broad boundary
                    # The type only: a message could quote what the client sent.
                    log.error("control_loop_error", error=type(exc).__name__)
                    stopping.wait(RECV_TIMEOUT_S)  # a socket that keeps failing must not spin
        finally:
            self.close()

    def _serve_one(self, sock: socket.socket) -> None:
        try:
            data, _ancillary, flags, sender = sock.recvmsg(MAX_DATAGRAM)
        except TimeoutError:
            self.expire()
            return
        reply = self.handle(data, sender, truncated=bool(flags & socket.MSG_TRUNC))
        if reply is not None:
            self._reply(sender, reply)
        self.expire()

    def handle(self, data: bytes, sender: Address = None, *,
               truncated: bool = False) -> dict[str, Any] | None:
        """The reply to one datagram, or None when it comes later (a tap's decision).
        Never raises."""
        op = "?"
        try:
            request = parse_request(data, truncated=truncated, types=self._types)
            op = str(getattr(request, "op", "?"))
            return self._handlers[type(request)](request, sender)
        except RequestError as exc:
            log.warning("control_request_refused", op=op, error=exc.code, detail=exc.message)
            return {"ok": False, "error": exc.code, "message": exc.message}
        except Exception as exc:  # noqa: BLE001 - a handler's failure is this request's only
            log.error("control_request_failed", op=op, error=type(exc).__name__)
            return {"ok": False, "error": "internal",
                    "message": f"the agent failed to carry out the request ({type(exc).__name__})"}

    # -- handlers ----------------------------------------------------------------------------

    def _tap(self, request: TapRequest, sender: Address) -> dict[str, Any] | None:
        readers = self._target.sim_readers()
        if request.reader not in readers:
            raise RequestError("unknown_reader", "reader: no simulated reader with that id "
                               f"(simulated readers: {', '.join(sorted(readers)) or 'none'})")
        with self._lock:
            taps = self._taps.setdefault(request.reader, deque())
            queued = self._target.sim_queued(request.reader)
            if queued >= self._max_queued or len(taps) >= 2 * self._max_queued:
                raise RequestError("busy", f"{max(queued, len(taps))} taps are waiting at "
                                   f"this reader already (at most {self._max_queued}); "
                                   "try again in a moment")
            self._target.sim_tap(request.reader, request.card)
            taps.append(_Tap(sender, self._clock()))
        log.debug("control_tap_queued", reader=request.reader)
        return None

    def _input(self, request: InputRequest, _sender: Address) -> dict[str, Any] | None:
        inputs = self._target.sim_inputs()
        if request.name not in inputs:
            raise RequestError("unknown_input", "name: no simulated input with that name "
                               f"(simulated inputs: {', '.join(sorted(inputs)) or 'none'})")
        self._target.sim_set_input(request.name, request.active)
        log.info("control_input_set", name=request.name, active=request.active)
        return {"ok": True, "op": "input", "name": request.name, "active": request.active}

    # -- decisions -----------------------------------------------------------------------------

    def decided(self, reader: str, granted: bool, reason: str) -> None:
        """A decision was made at ``reader``: answer the tap it was for. Called on the
        card path; never raises and never blocks on the client."""
        try:
            with self._lock:
                taps = self._taps.get(reader)
                if not taps:
                    return
                left = len(taps) - min(self._target.sim_queued(reader), len(taps))
                done = [taps.popleft() for _ in range(left)]
            if not done:
                return  # a read queued by someone else
            for tap in done[:-1]:
                if not tap.answered:
                    self._reply(tap.sender, _ignored())
            if not done[-1].answered:
                self._reply(done[-1].sender, {"ok": True, "op": "tap", "reader": reader,
                                              "granted": granted, "reason": reason})
        except Exception as exc:  # noqa: BLE001 - must not fail the card path that called it
            log.error("control_reply_failed", error=type(exc).__name__)

    def expire(self) -> None:
        """Answer taps waiting longer than the timeout with ``no_decision``, and forget
        the ones the reader has taken and will not decide (repeats within its debounce)."""
        now = self._clock()
        late: list[Address] = []
        with self._lock:
            for reader, taps in self._taps.items():
                left = len(taps) - min(self._target.sim_queued(reader), len(taps))
                for tap in taps:
                    if not tap.answered and now - tap.at >= self._tap_timeout:
                        tap.answered = True
                        late.append(tap.sender)
                while left > 0 and taps[0].answered:
                    taps.popleft()
                    left -= 1
        for sender in late:
            self._reply(sender, {
                "ok": False, "error": "no_decision",
                "message": f"no decision within {self._tap_timeout:g} s: the reader is "
                           "offline, or took the tap as a repeat of the same card within "
                           "its debounce time"})

    def _reply(self, sender: Address, reply: dict[str, Any]) -> None:
        sock = self._sock
        if not sender or sock is None:
            return
        try:
            # MSG_DONTWAIT: a client that stopped reading must not stall the card path.
            sock.sendto(json.dumps(reply).encode(), socket.MSG_DONTWAIT, sender)
        except OSError as exc:
            log.info("control_reply_undelivered", error=exc.strerror or type(exc).__name__)


def _ignored() -> dict[str, Any]:
    return {"ok": False, "error": "no_decision",
            "message": "the reader took the tap as a repeat of the same card within its "
                       "debounce time"}


# -- the client ------------------------------------------------------------------------------


def request(path: Path, message: dict[str, Any], *,
            timeout: float = CLIENT_TIMEOUT_S) -> dict[str, Any]:
    """Send ``message`` to the control socket at ``path`` and return the reply.

    Raises ``FileNotFoundError`` or ``ConnectionRefusedError`` when no agent serves the
    path, ``TimeoutError`` when it does not answer within ``timeout``, another
    ``OSError`` when the path cannot be reached, and ``ValueError`` for a reply that is
    not a JSON object.
    """
    data = json.dumps(message).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("")  # Linux autobind: an abstract address the agent can reply to
        sock.settimeout(timeout)
        sock.sendto(data, str(path))
        reply = json.loads(sock.recv(MAX_REPLY))
    if not isinstance(reply, dict):
        raise ValueError("the reply is not a JSON object")  # noqa: TRY004 - bad data, as json's own errors
    return reply

"""The control socket (agent/control.py): its request parser, its server with a fake agent
behind ``ControlTarget``, the socket file's life, and ``permitgate sim`` against a real
agent in-process."""

from __future__ import annotations

import io
import json
import socket
import stat
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent import cli, control
from agent.config import load_config
from agent.control import (
    MAX_DATAGRAM,
    MAX_QUEUED_TAPS,
    ControlServer,
    ControlSocketError,
    InputRequest,
    RequestError,
    TapRequest,
    parse_request,
    too_deep,
)
from agent.runtime import Agent
from agent.store import CredentialEntry
from drivers.simulated import SimBus
from protocol.hashing import CredentialHasher
from tests.agentconf import KEY, SIMULATED, DoorSpec, ReaderSpec, write_agent
from tests.conftest import wait_for

CARD = "em4100:67003B51C6"
OTHER_CARD = "em4100:DEADBEEF00"
RAW = "67003B51C6"
"""The number part of CARD: it must never show in a log or an error message."""


def request_bytes(**fields: Any) -> bytes:
    """One datagram holding ``fields`` as a JSON object."""
    return json.dumps(fields).encode()


def refused(data: bytes) -> RequestError:
    """The RequestError ``parse_request`` raises for ``data``."""
    with pytest.raises(RequestError) as info:
        parse_request(data)
    return info.value


# -- parsing -------------------------------------------------------------------------------


def test_tap_and_input_requests_parse() -> None:
    """The two requests ``permitgate sim`` sends parse to their models."""
    assert parse_request(request_bytes(op="tap", reader="front-in", card=CARD)) == \
        TapRequest(op="tap", reader="front-in", card=CARD)
    assert parse_request(request_bytes(op="input", name="front.contact", active=False)) == \
        InputRequest(op="input", name="front.contact", active=False)


def test_three_thousand_brackets_are_refused_without_recursion() -> None:
    """3,000 bytes of '[' are refused as too large, and 1,000 (under the size limit) as
    nested too deeply: neither reaches json.loads' recursion."""
    assert refused(b"[" * 3000).code == "too_large"
    error = refused(b"[" * 1000)
    assert error.code == "malformed"
    assert "nested more than" in error.message


def test_depth_scan_is_linear_and_ignores_brackets_in_strings() -> None:
    """The depth scan handles a megabyte of brackets, counts only brackets outside
    strings (escaped quotes included), and admits the flat requests."""
    assert too_deep(b"[" * 1_000_000)
    assert not too_deep(b'{"reader": "[[[[[[[[[[\\"[[[[[[", "x": [[1]]}')
    assert too_deep(b'{"a": [[[[1]]]]}')


@pytest.mark.parametrize("active", ["false", "true", 0, 1, None, [True]])
def test_active_must_be_a_json_boolean(active: object) -> None:
    """"false", 0, 1 and null are not booleans: the request is refused naming the field."""
    error = refused(request_bytes(op="input", name="front.contact", active=active))
    assert error.code == "bad_request"
    assert error.message.startswith("active: ")


@pytest.mark.parametrize(("data", "code", "words"), [
    pytest.param(b"\xff\xfe", "malformed", "not UTF-8", id="not_utf8"),
    pytest.param(b"tap front-in", "malformed", "not a JSON document", id="not_json"),
    pytest.param(b'{"op": "tap", "x": NaN}', "malformed", "NaN", id="nan"),
    pytest.param(b'["tap"]', "bad_request", "a JSON object", id="array"),
    pytest.param(b'{"reader": "front-in"}', "bad_request", "op: missing", id="no_op"),
    pytest.param(b'{"op": 7}', "unknown_op", "one of: input, tap", id="op_not_a_string"),
    pytest.param(b'{"op": "tap", "op": "input"}', "bad_request", "given twice",
                 id="duplicate_field"),
    pytest.param(request_bytes(op="tap", reader="front-in"), "bad_request", "card: missing",
                 id="card_missing"),
    pytest.param(request_bytes(op="tap", reader="r" * 64, card=CARD), "bad_request",
                 "reader: String should have at most 63 characters", id="reader_too_long"),
    pytest.param(request_bytes(op="tap", reader=5, card=CARD), "bad_request",
                 "reader: Input should be a valid string", id="reader_not_a_string"),
    pytest.param(b" " * (MAX_DATAGRAM + 1), "too_large", f"at most {MAX_DATAGRAM}",
                 id="too_large"),
])
def test_malformed_requests_are_refused_with_a_reason(data: bytes, code: str,
                                                      words: str) -> None:
    """Each kind of bad datagram is refused with its code and a message saying what was
    wrong."""
    error = refused(data)
    assert error.code == code
    assert words in error.message


@pytest.mark.parametrize("card", [
    "em4100 67003B51C6", "67003B51C6", "EM4100:67003B51C6", "em4100:", "em4100:67003B51C6\n",
    "em4100:6700\u00e93B51C6", "em4100:" + "A" * 129,
])
def test_malformed_card_is_refused_without_repeating_it(card: str) -> None:
    """A card id that is not ``<kind>:<printable id>`` is refused naming the card field,
    never quoting the value."""
    error = refused(request_bytes(op="tap", reader="front-in", card=card))
    assert error.code == "bad_request"
    assert error.message.startswith("card: ")
    assert "6700" not in error.message


@pytest.mark.parametrize("data", [
    request_bytes(op="tap", reader="front-in", crad=CARD),
    request_bytes(op="tap", reader="front-in", card=CARD, **{CARD: 1}),
    request_bytes(op=CARD),
    request_bytes(op="input", name="front.contact", active=True, note=CARD),
])
def test_card_in_a_wrong_field_is_not_echoed(data: bytes) -> None:
    """A card id sent as an unknown field, a field name or an op is refused without
    naming it: the message lists what is accepted instead."""
    error = refused(data)
    assert RAW not in error.message
    assert "unknown" in error.message


# -- the server, with a fake agent -------------------------------------------------------------


class FakeAgent:
    """A ``ControlTarget`` whose reader queue the test empties by hand."""

    def __init__(self) -> None:
        self.queue: deque[str] = deque()
        self.levels: dict[str, bool] = {}
        self.fail = False

    def sim_readers(self) -> frozenset[str]:
        """One simulated reader."""
        return frozenset({"front-in"})

    def sim_inputs(self) -> frozenset[str]:
        """One simulated input."""
        return frozenset({"front.contact"})

    def sim_queued(self, reader: str) -> int:
        """Taps in the queue."""
        assert reader == "front-in"
        return len(self.queue)

    def sim_tap(self, reader: str, card: str) -> None:
        """Queue the tap, or fail with the card in the message when told to."""
        if self.fail:
            raise RuntimeError(f"failed on {card}")
        self.queue.append(card)

    def sim_set_input(self, name: str, active: bool) -> None:
        """Record the level."""
        self.levels[name] = active


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake() -> FakeAgent:
    """A fresh fake agent."""
    return FakeAgent()


@pytest.fixture
def clock() -> Clock:
    """A fresh fake clock."""
    return Clock()


@pytest.fixture
def server(tmp_path: Path, fake: FakeAgent, clock: Clock) -> Iterator[ControlServer]:
    """A bound server (no loop running: the test calls ``handle`` itself)."""
    srv = ControlServer(tmp_path / "sim.sock", fake, clock=clock)
    srv.bind()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def client() -> Iterator[socket.socket]:
    """A client socket on an abstract address, as ``permitgate sim`` binds."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("")
        sock.settimeout(5.0)
        yield sock


def reply_to(sock: socket.socket) -> dict[str, Any]:
    """The next reply datagram ``sock`` receives."""
    reply = json.loads(sock.recv(65536))
    assert isinstance(reply, dict)
    return reply


@pytest.fixture
def served(server: ControlServer) -> Iterator[ControlServer]:
    """``server`` with its loop running in a thread; the loop must end when stopped."""
    stopping = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stopping,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stopping.set()
        thread.join(5.0)
        assert not thread.is_alive()


def test_tap_is_queued_and_answered_with_its_decision(
        server: ControlServer, fake: FakeAgent, client: socket.socket) -> None:
    """A tap is queued at the reader and its sender gets the decision the card path
    reports for it."""
    assert server.handle(request_bytes(op="tap", reader="front-in", card=CARD),
                         client.getsockname()) is None
    assert list(fake.queue) == [CARD]
    fake.queue.popleft()  # the reader thread takes it ...
    server.decided("front-in", False, "unknown_card")  # ... and the card path decides
    assert reply_to(client) == {"ok": True, "op": "tap", "reader": "front-in",
                                "granted": False, "reason": "unknown_card"}


def test_decision_for_a_read_queued_by_someone_else_is_not_answered(
        server: ControlServer, fake: FakeAgent, client: socket.socket) -> None:
    """A decision while this server's tap is still queued belongs to another read: the
    tap is answered only with its own decision."""
    server.handle(request_bytes(op="tap", reader="front-in", card=CARD), client.getsockname())
    server.decided("front-in", True, "granted")  # the tap is still in the queue
    fake.queue.popleft()
    server.decided("front-in", False, "revoked")
    assert reply_to(client)["reason"] == "revoked"


def test_taps_dropped_as_repeats_are_answered_as_such(
        server: ControlServer, fake: FakeAgent, client: socket.socket) -> None:
    """Taps the reader took without a decision (repeats within its debounce) are
    answered no_decision when a later tap is decided, which gets its own decision."""
    for card in (CARD, CARD, OTHER_CARD):
        server.handle(request_bytes(op="tap", reader="front-in", card=card),
                      client.getsockname())
    fake.queue.popleft()
    server.decided("front-in", True, "granted")
    assert reply_to(client)["reason"] == "granted"
    fake.queue.clear()  # the reader took the repeat, dropped it, and took the other card
    server.decided("front-in", False, "unknown_card")
    repeat, other = reply_to(client), reply_to(client)
    assert repeat["error"] == "no_decision" and "repeat" in repeat["message"]
    assert other == {"ok": True, "op": "tap", "reader": "front-in", "granted": False,
                     "reason": "unknown_card"}


def test_undecided_tap_times_out_with_no_decision(
        server: ControlServer, fake: FakeAgent, clock: Clock, client: socket.socket) -> None:
    """A tap nobody decides is answered no_decision once the timeout has passed, and a
    late decision for it is not sent a second time."""
    server.handle(request_bytes(op="tap", reader="front-in", card=CARD), client.getsockname())
    server.expire()
    clock.now += control.TAP_REPLY_TIMEOUT_S
    server.expire()
    reply = reply_to(client)
    assert reply["error"] == "no_decision" and "offline" in reply["message"]
    fake.queue.clear()
    server.decided("front-in", True, "granted")
    client.settimeout(0.0)
    with pytest.raises(BlockingIOError):
        client.recv(65536)


def test_queue_is_bounded_and_refuses_busy(server: ControlServer, fake: FakeAgent) -> None:
    """Beyond MAX_QUEUED_TAPS taps waiting at a reader, a tap is refused busy and not
    queued."""
    for _ in range(MAX_QUEUED_TAPS):
        assert server.handle(request_bytes(op="tap", reader="front-in", card=CARD)) is None
    reply = server.handle(request_bytes(op="tap", reader="front-in", card=CARD))
    assert reply is not None and reply["error"] == "busy"
    assert len(fake.queue) == MAX_QUEUED_TAPS


def test_unknown_reader_and_input_are_refused(server: ControlServer, fake: FakeAgent) -> None:
    """A tap at a reader that is not simulated and an input that does not exist are
    refused, naming the ones that do, and change nothing."""
    tap = server.handle(request_bytes(op="tap", reader="back-in", card=CARD))
    assert tap == {"ok": False, "error": "unknown_reader", "message":
                   "reader: no simulated reader with that id (simulated readers: front-in)"}
    level = server.handle(request_bytes(op="input", name="back.contact", active=True))
    assert level is not None and level["error"] == "unknown_input"
    assert "front.contact" in level["message"]
    assert not fake.queue and not fake.levels


def test_input_sets_the_level_and_replies(server: ControlServer, fake: FakeAgent) -> None:
    """An input request sets exactly the boolean sent and says so."""
    reply = server.handle(request_bytes(op="input", name="front.contact", active=False))
    assert reply == {"ok": True, "op": "input", "name": "front.contact", "active": False}
    assert fake.levels == {"front.contact": False}


def test_nothing_a_client_sends_reaches_the_logs(server: ControlServer, fake: FakeAgent) -> None:
    """Refused requests and a handler that fails with the card in its message log what
    was wrong, never the card."""
    fake.fail = True
    with capture_logs() as logs:
        for data in (request_bytes(op=CARD), request_bytes(op="tap", reader="x", crad=CARD),
                     request_bytes(op="input", name=CARD, active=True),
                     request_bytes(op="tap", reader="front-in", card=CARD),
                     request_bytes(op="tap", reader=CARD, card=CARD)):
            reply = server.handle(data)
            assert reply is not None and RAW not in json.dumps(reply)
    assert len(logs) == 5
    assert RAW not in repr(logs)
    assert logs[3]["error"] == "RuntimeError"


def test_no_datagram_stops_the_loop(served: ControlServer, fake: FakeAgent,
                                    client: socket.socket) -> None:
    """After an oversized datagram, a bracket bomb, garbage and a failing handler, the
    loop still answers the next request."""
    path = str(served.path)
    fake.fail = True
    for data in (b"[" * 3000, b"[" * 1000, b"\x00\xff", b"{}",
                 request_bytes(op="tap", reader="front-in", card=CARD)):
        client.sendto(data, path)
        assert reply_to(client)["ok"] is False
    fake.fail = False
    client.sendto(request_bytes(op="input", name="front.contact", active=True), path)
    assert reply_to(client)["ok"] is True


def test_unbound_sender_is_served_without_a_reply(served: ControlServer,
                                                  fake: FakeAgent) -> None:
    """A sender without an address (older clients, scripts) still has its tap queued."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(request_bytes(op="tap", reader="front-in", card=CARD), str(served.path))
    wait_for(lambda: list(fake.queue) == [CARD], "the tap to be queued")


def test_request_client_round_trip(served: ControlServer, fake: FakeAgent) -> None:
    """``control.request`` sends a request and returns the reply."""
    reply = control.request(served.path, {"op": "input", "name": "front.contact",
                                          "active": True})
    assert reply["ok"] is True
    assert fake.levels == {"front.contact": True}


# -- the socket file -------------------------------------------------------------------------


def test_socket_is_private_from_the_start_and_removed_on_close(tmp_path: Path,
                                                               fake: FakeAgent) -> None:
    """The socket file is created mode 0600 and removed when the server closes."""
    path = tmp_path / "sim.sock"
    srv = ControlServer(path, fake)
    srv.bind()
    mode = path.lstat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    srv.close()
    assert not path.exists()
    srv.close()  # twice is fine


def test_close_leaves_a_socket_another_process_bound(tmp_path: Path, fake: FakeAgent) -> None:
    """If the path was replaced after bind (another agent took it over), close removes
    nothing: the file is not the one this server bound."""
    path = tmp_path / "sim.sock"
    srv = ControlServer(path, fake)
    srv.bind()
    path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as other:
        other.bind(str(path))
        srv.close()
        assert stat.S_ISSOCK(path.lstat().st_mode)


def test_stale_socket_is_replaced(tmp_path: Path, fake: FakeAgent) -> None:
    """A socket file nobody is bound to (a killed agent's) is replaced at bind, and
    datagrams sent to the path reach the new server."""
    path = tmp_path / "sim.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dead:
        dead.bind(str(path))
    srv = ControlServer(path, fake)
    srv.bind()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"hello", str(path))
        assert srv.bound_socket is not None
        assert srv.bound_socket.recv(16) == b"hello"
    finally:
        srv.close()


def test_live_socket_and_other_files_are_refused(tmp_path: Path, fake: FakeAgent) -> None:
    """A socket another process serves, or a file that is not a socket, is refused and
    left in place."""
    path = tmp_path / "sim.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as live:
        live.bind(str(path))
        with pytest.raises(ControlSocketError, match="another process is serving"):
            ControlServer(path, fake).bind()
        assert stat.S_ISSOCK(path.lstat().st_mode)
    path.unlink()
    path.write_text("notes")
    with pytest.raises(ControlSocketError, match="is not a socket"):
        ControlServer(path, fake).bind()
    assert path.read_text() == "notes"


def test_unbindable_path_is_a_clear_error(tmp_path: Path, fake: FakeAgent) -> None:
    """A socket path longer than AF_UNIX allows is a ControlSocketError (an OSError: exit
    status 1) naming the path."""
    path = tmp_path / ("d" * 120) / "sim.sock"
    with pytest.raises(ControlSocketError, match="cannot create the control socket"):
        ControlServer(path, fake).bind()


# -- a real agent, and permitgate sim ---------------------------------------------------------

def write_config(folder: Path) -> Path:
    """A site key and a configuration in ``folder``: one door with a simulated relay and
    contact, a simulated entry reader and a serial exit reader (not simulated)."""
    return write_agent(
        folder, site_id="t", gateway_id="t-gw", store={"path": "pg.db"},
        doors=(DoorSpec(unlock_s=0.2, contact=SIMULATED),),
        readers=(ReaderSpec("front-in", debounce_s=30),
                 ReaderSpec("front-out", direction="exit", driver="serial", debounce_s=None,
                            options={"port": "/dev/null-permitgate-test"})))


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[Agent, Path]]:
    """A started agent with simulated devices (CARD enrolled) and its configuration file."""
    config_path = write_config(tmp_path)
    running = Agent(load_config(config_path), config_path=config_path, bus=SimBus())
    running.start()
    try:
        assert running.store is not None
        running.store.replace_allowlist(
            [CredentialEntry(CredentialHasher(KEY).credential(CARD))], 1)
        yield running, config_path
    finally:
        running.stop()


def run_sim(config_path: Path, *argv: str) -> tuple[int, str]:
    """``permitgate sim ARGV -c CONFIG`` in-process: exit status and standard output."""
    out = io.StringIO()
    status = cli.main(["sim", *argv, "-c", str(config_path)], out=out)
    return status, out.getvalue()


def test_sim_tap_prints_the_decision_and_its_reason(agent: tuple[Agent, Path]) -> None:
    """``permitgate sim tap`` prints the decision and reason the agent replies with."""
    _, config_path = agent
    assert run_sim(config_path, "tap", "front-in", CARD) == (0, "OPEN   granted\n")
    assert run_sim(config_path, "tap", "front-in", OTHER_CARD) == (0, "DENIED unknown_card\n")


def test_repeat_within_debounce_is_answered_as_a_repeat(agent: tuple[Agent, Path],
                                                        client: socket.socket) -> None:
    """Through the real reader thread, a repeat of the same card within the reader's
    debounce gets no decision and is told so once the next card is decided."""
    running, _ = agent
    path = str(running.sim_socket_path)
    for card in (CARD, CARD, OTHER_CARD):
        client.sendto(request_bytes(op="tap", reader="front-in", card=card), path)
    replies = [reply_to(client) for _ in range(3)]
    assert [r.get("reason") or r.get("error") for r in replies] == \
        ["granted", "no_decision", "unknown_card"]


def test_sim_input_sets_a_simulated_input(agent: tuple[Agent, Path]) -> None:
    """``permitgate sim input`` sets the level on the agent's bus and echoes it."""
    running, config_path = agent
    assert run_sim(config_path, "input", "front.contact", "on") == (0, "front.contact on\n")
    assert running.bus.level("front.contact") is True


@pytest.mark.parametrize(("argv", "words"), [
    pytest.param(("tap", "front-in", "em4100 67003B51C6"), "not a normalised card id",
                 id="malformed_card"),
    pytest.param(("tap", "front-in", "em4100:" + "67003B51C6" * 20), "longer than 161",
                 id="oversized_card"),
    pytest.param(("tap", "front-out", CARD), "is not simulated", id="real_reader"),
    pytest.param(("input", "front.rex", "on"), "no simulated input 'front.rex'",
                 id="unknown_input"),
])
def test_sim_refuses_bad_arguments_with_exit_2(tmp_path: Path, argv: tuple[str, ...],
                                               words: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Malformed or oversized card ids, a reader that is not simulated and an unknown
    input exit 2 before anything is sent, and the card is not repeated."""
    config_path = write_config(tmp_path)
    status, out = run_sim(config_path, *argv)
    err = capsys.readouterr().err
    assert (status, out) == (2, "")
    assert words in err
    assert RAW not in err


def test_agent_refusal_is_reported_with_its_exit_status(agent: tuple[Agent, Path],
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    """A tap the agent refuses as busy exits 1 with the agent's message."""
    running, config_path = agent
    monkeypatch.setattr(running, "sim_queued", lambda _reader: MAX_QUEUED_TAPS)
    status, out = run_sim(config_path, "tap", "front-in", CARD)
    assert (status, out) == (1, "")
    assert "the agent refused the tap" in capsys.readouterr().err


def test_agent_stop_removes_its_socket(tmp_path: Path) -> None:
    """A stopped agent leaves no socket file behind."""
    config_path = write_config(tmp_path)
    running = Agent(load_config(config_path), config_path=config_path, bus=SimBus())
    running.start()
    assert stat.S_ISSOCK(running.sim_socket_path.lstat().st_mode)
    running.stop()
    assert not running.sim_socket_path.exists()

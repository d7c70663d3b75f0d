"""The agent's control sockets: the part of ``agent.runtime.Agent`` that hosts enrollment
(agent/enroll.py, agent/tenant_ops.py) and the simulated devices (agent/control.py).

With ``[enrollment]`` on, the agent holds the ``Enroller`` and serves the tenant requests
on ``web.sock`` (the landlord page) and ``sim.sock`` (the CLI); the office's answers to
enrollments arrive from sync (``enrollment_decided``). With simulated devices configured,
``sim.sock`` also takes taps and input changes for the simulated bus, and answers a tap
with the decision it led to. The agent is ``TenantHost`` and ``ControlTarget`` here.

``ControlHosting`` is a mixin: ``Agent`` sets the attributes it declares.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from agent.config import Config, ReaderConfig
from agent.control import ControlServer, simulated_inputs, simulated_readers
from agent.decision import Decision
from agent.enroll import Captures, Enroller, EnrollError, EnrollmentPolicy
from agent.resolve import Paths, Secrets
from agent.runtime_cards import ReadTiming
from agent.store import Store
from agent.tenant_ops import TenantOps
from drivers.simulated import SimBus
from protocol.chain import Event
from protocol.hashing import CredentialHasher
from protocol.messages import Decided

log = structlog.get_logger()


class ControlHosting:
    """Enrollment and the control sockets of ``agent.runtime.Agent`` (which sets these
    attributes)."""

    config: Config
    paths: Paths
    store_path: Path
    store: Store | None
    hasher: CredentialHasher | None
    bus: SimBus
    captures: Captures
    on_decision: Callable[[ReaderConfig, Decision, ReadTiming], None] | None
    _enroller: Enroller | None
    _servers: list[ControlServer]
    _sim_socket: socket.socket | None
    _stopping: threading.Event
    # From the other parts of the agent (agent/runtime_store.py, agent/runtime.py):
    _record: Callable[..., None]
    _spawn: Callable[..., None]

    # -- enrollment (agent/enroll.py, agent/tenant_ops.py) ---------------------------

    def _start_enrollment(self, secrets: Secrets) -> None:
        assert self.store is not None and self.hasher is not None
        cfg = self.config.enrollment
        policy = EnrollmentPolicy(units=cfg.units, provisional_s=int(cfg.provisional_h * 3600),
                                  max_lease_days=cfg.max_lease_days,
                                  gateway=self.config.site.gateway_id)
        self._enroller = Enroller(self.store, self.hasher, policy, secrets.seal_key,
                                  signing_key=secrets.signing_key)
        if secrets.signing_key is None:
            log.warning("enrollment_signing_key_missing", path=str(self.paths.signing_key),
                        hint="enrollments go unsigned; an office that recorded this "
                        "gateway's signing key rejects them (install the key made by "
                        "'permitgate provision')")
        if secrets.seal_key is None:
            log.warning("enrollment_seal_key_missing", path=str(self.paths.seal_key),
                        hint="install the office's seal key; enrollments are refused "
                        "until then")
        server = ControlServer(self.paths.web_socket, None,
                               extra=TenantOps(self).handlers(),
                               mode=0o660 if secrets.web_group is not None else 0o600,
                               group=secrets.web_group)
        server.bind()
        self._servers.append(server)
        self._spawn("web-control", server.serve, self._stopping)

    def enrollment_decided(self, decided: Decided) -> None:
        """The office's answer to an enrollment (``SyncHost``)."""
        if self._enroller is None:
            log.warning("enrollment_decision_ignored", enrollment=decided.enrollment,
                        hint="enrollment is not enabled on this gateway")
            return
        if self._enroller.apply_decision(decided.enrollment,
                                         confirmed=decided.status == "confirmed",
                                         list_version=decided.list_version,
                                         reason=decided.reason) is None:
            log.info("enrollment_decision_moot", enrollment=decided.enrollment,
                     status=decided.status)

    def tenant_store(self) -> Store:
        """The open store (``TenantHost``)."""
        assert self.store is not None
        return self.store

    def enroller(self) -> Enroller:
        """The enroller (``TenantHost``)."""
        if self._enroller is None:
            raise EnrollError("enrollment", "disabled", "enrollment is not enabled on this "
                              "gateway ([enrollment] enabled = true)")
        return self._enroller

    def record(self, event: Event) -> None:
        """Append an event to the chain (``TenantHost``)."""
        self._record(event)

    # -- simulation control ----------------------------------------------------------

    def _uses_simulation(self) -> bool:
        return any(r.driver == "simulated" for r in self.config.readers) or any(
            dev is not None and dev.driver == "simulated"
            for d in self.config.doors for dev in (d.contact, d.rex))

    @property
    def sim_socket_path(self) -> Path:
        """Where ``permitgate sim`` reaches this agent."""
        return self.store_path.parent / "sim.sock"

    def _start_sim_socket(self) -> None:
        """Serve the control socket (agent/control.py), which sees this agent only as its
        ``ControlTarget``: the ``sim_*`` methods below."""
        extra = TenantOps(self).handlers() if self.config.enrollment.enabled else None
        server = ControlServer(self.sim_socket_path,
                               self if self._uses_simulation() else None, extra=extra)
        server.bind()
        self._sim_socket = server.bound_socket
        self._sim_close = server.close
        earlier = self.on_decision

        def answer_taps(reader: ReaderConfig, decision: Decision, timing: ReadTiming) -> None:
            server.decided(reader.id, decision.granted, decision.reason.value)
            if earlier is not None:
                earlier(reader, decision, timing)

        self.on_decision = answer_taps
        self._spawn("sim-control", self._sim_loop, server)

    def _sim_loop(self, server: ControlServer) -> None:
        server.serve(self._stopping)

    def sim_readers(self) -> frozenset[str]:
        """Ids of the readers whose cards come from simulated taps."""
        return simulated_readers(self.config)

    def sim_inputs(self) -> frozenset[str]:
        """Names of the simulated inputs ``permitgate sim input`` may set."""
        return simulated_inputs(self.config)

    def sim_queued(self, reader: str) -> int:
        """Taps waiting at the simulated ``reader``."""
        return self.bus.tap_queue(reader).qsize()

    def sim_tap(self, reader: str, card: str) -> None:
        """Present ``card`` at the simulated ``reader``."""
        self.bus.tap(reader, card)

    def sim_set_input(self, name: str, active: bool) -> None:
        """Set the simulated input ``name``."""
        self.bus.set_level(name, active)


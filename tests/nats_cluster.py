"""A real three-node NATS cluster with MQTT enabled, for the clustered-broker tests.

Not a test module: tests/test_cluster.py builds on it. Each node is Debian's
``nats-server`` (2.9) as a child process with its own folder under the test's temporary
folder: its configuration, its JetStream store and its log. The nodes are routed to each
other (one cluster), run JetStream (NATS's MQTT needs it, and a ``server_name``) and listen
for MQTT 3.1.1 clients (NATS refuses MQTT 5) on 127.0.0.1; the MQTT streams are replicated
to all three nodes, so sessions, subscriptions and queued QoS 1 messages outlive any one
node. Every port is chosen free at start; nothing here touches a NATS server already
running on the machine (Debian's own listens on 4222 with its own store).

Which node a client is connected to is read from the node's monitoring endpoint
(``/connz``, which names MQTT clients by their client id).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.waiting import wait_for

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
"""A bound on a cluster's start (routes, JetStream's meta leader); not an expectation."""
STOP_TIMEOUT_S = 15.0
_CANDIDATES = ("/usr/sbin/nats-server", "/usr/local/bin/nats-server", "/usr/bin/nats-server")


def nats_binary() -> str:
    """The nats-server executable; fails the test (never skips) when it is missing."""
    found = shutil.which("nats-server")
    if found is None:
        found = next((c for c in _CANDIDATES if os.access(c, os.X_OK)), None)
    if found is None:
        pytest.fail("nats-server is not installed (looked on PATH and in "
                    f"{', '.join(_CANDIDATES)}); the cluster tests need a real one: "
                    "apt-get install nats-server", pytrace=False)
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that nothing listens on right now (all
    bound at once, so no two are the same)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                 for _ in range(count)]
        for sock in socks:
            sock.bind((HOST, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


class NatsNode:
    """One nats-server of the cluster; ``host`` and ``port`` are its MQTT listener."""

    def __init__(self, folder: Path, name: str, ports: list[int]) -> None:
        self.folder = folder
        self.name = name
        self.client_port, self.route_port, self.http_port, self.mqtt_port = ports
        self.config_path = folder / "nats.conf"
        self.store_dir = folder / "jetstream"
        self.log_path = folder / "nats.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        """The address every listener is bound to."""
        return HOST

    @property
    def port(self) -> int:
        """The MQTT port (the one gateways and the office connect to)."""
        return self.mqtt_port

    @property
    def endpoint(self) -> str:
        """``host:port`` of the MQTT listener, as ``[sync] brokers`` lists it."""
        return f"{HOST}:{self.mqtt_port}"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    def log(self) -> str:
        """The node's log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def write_config(self, cluster: str, routes: list[int]) -> None:
        """The node's configuration: routes to ``routes`` (the other nodes' route ports)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        route_urls = ", ".join(f'"nats-route://{HOST}:{p}"' for p in routes)
        self.config_path.write_text(f"""\
server_name: "{self.name}"
listen: "{HOST}:{self.client_port}"
http: "{HOST}:{self.http_port}"
jetstream {{
  store_dir: "{self.store_dir}"
  max_memory_store: 64MB
  max_file_store: 512MB
}}
cluster {{
  name: "{cluster}"
  listen: "{HOST}:{self.route_port}"
  routes: [{route_urls}]
}}
mqtt {{
  listen: "{HOST}:{self.mqtt_port}"
  # Sessions, subscriptions, queued QoS 1 and retained messages on every node, so a
  # client that loses its node resumes its session on another.
  stream_replicas: 3
}}
""")

    def start(self) -> None:
        """Run the node (the caller waits for the cluster to form)."""
        if self.running:
            raise RuntimeError(f"{self.name} runs already")
        with self.log_path.open("ab") as out:
            self._process = subprocess.Popen(
                [nats_binary(), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """SIGKILL, as when the machine running it dies; waits for it to be gone."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM and wait (a node that ignores it is killed)."""
        self._end(signal.SIGTERM)

    def _end(self, sig: signal.Signals) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def monitor(self, path: str) -> Any:
        """A JSON document from the node's monitoring endpoint (None when it does not
        answer, or answers with an error status)."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.http_port}{path}",
                                        timeout=2.0) as reply:
                return json.loads(reply.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def mqtt_clients(self) -> set[str]:
        """The client ids of the MQTT clients connected to this node now."""
        connz = self.monitor("/connz?limit=1024")
        if not connz:
            return set()
        return {c["mqtt_client"] for c in connz.get("connections") or []
                if c.get("mqtt_client")}

    def healthy(self) -> bool:
        """Whether the node answers ``/healthz`` with ``ok`` (JetStream current with its
        meta leader); raises ``RuntimeError`` with the log if the process has exited."""
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(f"nats-server {self.name} exited with status "
                               f"{self._process.returncode}; log:\n{self.log()}")
        health = self.monitor("/healthz")
        return bool(health) and health.get("status") == "ok"


class NatsCluster:
    """Three (or ``size``) routed nodes with JetStream and MQTT, in ``folder``."""

    def __init__(self, folder: Path, size: int = 3, name: str = "pgtest") -> None:
        self.folder = folder
        self.name = name
        ports = free_ports(4 * size)
        self.nodes = [NatsNode(folder / f"n{i + 1}", f"n{i + 1}", ports[4 * i:4 * i + 4])
                      for i in range(size)]

    def start(self) -> None:
        """Start every node and return once all are routed to each other and JetStream
        has a meta leader (every node's ``/healthz`` says ``ok``)."""
        for node in self.nodes:
            node.write_config(self.name, [n.route_port for n in self.nodes if n is not node])
        for node in self.nodes:
            node.start()

        def formed() -> bool:
            if not all(node.healthy() for node in self.nodes):
                return False
            return all((node.monitor("/routez") or {}).get("num_routes", 0)
                       >= len(self.nodes) - 1 for node in self.nodes)

        wait_for(formed, lambda: "the NATS cluster to form; logs:\n" + "\n".join(
            f"--- {n.name}\n{n.log()[-3000:]}" for n in self.nodes), START_TIMEOUT_S,
            interval=0.2)

    @property
    def endpoints(self) -> list[str]:
        """Every node's MQTT ``host:port``, in node order."""
        return [node.endpoint for node in self.nodes]

    def node_of(self, client_id: str) -> NatsNode | None:
        """The running node the MQTT client ``client_id`` is connected to, if any."""
        for node in self.nodes:
            if node.running and client_id in node.mqtt_clients():
                return node
        return None

    def logs(self) -> str:
        """The tail of every node's log, for failure messages."""
        return "\n".join(f"--- {n.name}\n{n.log()[-4000:]}" for n in self.nodes)

    def close(self) -> None:
        """Stop every node still running."""
        for node in self.nodes:
            node.stop()

"""Rotating the office's signing key end to end: the reference office (``serve`` in a
thread, driven by ``permitgate-central rotate-key`` through its request queue), a real
Mosquitto, and an in-process agent that stays connected throughout.
"""

from __future__ import annotations

import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.decision import Decision, Mode, Reason
from protocol.messages import Command
from protocol.signing import load_trusted_keys
from provisioning import central_cli
from provisioning.central import TRUSTED_KEYS_NAME, Central, keygen
from provisioning.rotation import RETIRED_KEYS_NAME, announced_set
from tests.agentconf import KEY
from tests.broker import Broker
from tests.conftest import wait_for
from tests.test_central import Serving
from tests.test_sync import GW, Gateway
from tests.test_sync import Office as HandOffice
from tests.test_sync_apply import CARD_A, CARD_B, CARD_C

CARD_D = "em4100:A1B2C3D4E5"


def cli(folder: Path, broker: Broker, *args: str) -> int:
    """Run ``permitgate-central`` on ``folder`` and the test broker."""
    return central_cli.main(["--dir", str(folder), "--host", broker.host, "--port",
                             str(broker.port), *args])


def test_keys_rotate_while_the_agent_is_connected(broker: Broker, tmp_path: Path) -> None:
    """The new key is announced (signed by the old one) and applied, revocations apply
    before, during and after the change-over, the office signs with the new key once
    the old one is retired, and a message signed with the old key is then refused as
    unknown_key while the gateway keeps working."""
    folder = tmp_path / "central"
    keygen(folder)
    with Central(folder, broker.host, broker.port) as central:
        central.add_gateway(GW, "b-1", KEY)
        for number, card in enumerate((CARD_A, CARD_B, CARD_C, CARD_D)):
            central.enroll(GW, card, f"P-{number}")
    serving = Serving(Central(folder, broker.host, broker.port, resync_interval_s=0.5),
                      heartbeat_every_s=1.0)
    office = serving.central
    (tmp_path / "gw").mkdir()
    gateway = Gateway(tmp_path / "gw", broker, folder / TRUSTED_KEYS_NAME)
    hand = HandOffice(broker, tmp_path)
    gateway.agent.start()
    try:
        wait_for(lambda: gateway.versions().get("list"), "the list applied")

        def revoked(card: str) -> None:
            seq = office.revoke_card(GW, card)
            wait_for(lambda: gateway.versions().get("rev", 0) >= seq, f"{card} revoked")
            assert gateway.tap(card) == Decision(False, Reason.REVOKED)

        revoked(CARD_A)  # the old key, alone

        assert cli(folder, broker, "rotate-key", "--kid", "central-2") == 0
        assert set(load_trusted_keys(folder / TRUSTED_KEYS_NAME)) == {"central-1",
                                                                       "central-2"}
        announced, _held = office.key_rotation_state()
        wait_for(lambda: gateway.versions().get("keys") == announced, "the new key trusted")
        wait_for(lambda: office.key_rotation_state()[1] == {GW: announced},
                 "the announcement reported applied")
        assert office.signing_kid() == "central-1"
        revoked(CARD_B)  # the change-over: the old key signs, both are trusted

        assert cli(folder, broker, "rotate-key", "--retire", "central-1") == 0
        assert office.signing_kid() == "central-2"
        assert set(load_trusted_keys(folder / TRUSTED_KEYS_NAME)) == {"central-2"}
        assert [(k.kid, k.state) for k in announced_set(folder, int(time.time()))] == [
            ("central-2", "active"), ("central-1", "retired")]
        retired_seq = office.key_rotation_state()[0]
        wait_for(lambda: gateway.versions().get("keys") == retired_seq, "the old key retired")
        revoked(CARD_C)  # the new key, alone

        # Someone still holding the old private key signs a lockdown: refused.
        old_key = serialization.load_pem_private_key(
            (folder / "signing" / "retired" / "central-1.pem").read_bytes(), password=None)
        assert isinstance(old_key, Ed25519PrivateKey)
        cmd = gateway.versions().get("cmd", 0) + 1
        hand.send("cmd", Command(type="command", action="lockdown", **hand.header("cmd", seq=cmd)),
                  key=old_key, kid="central-1")
        wait_for(lambda: (office.gateway_report(GW)["applied"].get("cmd") or {}).get("reason")
                 == "unknown_key", "the old key's command reported refused")
        assert gateway.agent.policy.mode is Mode.NORMAL
        refusal = [e for e in gateway.agent.store.events(kind="sync_refused")  # type: ignore[union-attr]
                   if e.reason == "unknown_key"]
        assert "retired" in refusal[-1].data["detail"]
        revoked(CARD_D)  # and the new key's messages still apply
        assert (folder / RETIRED_KEYS_NAME).read_text().startswith("central-1 ")
    finally:
        hand.close()
        gateway.agent.stop()
        serving.stop()


def test_retiring_is_refused_until_every_gateway_holds_the_new_key(
        broker: Broker, tmp_path: Path) -> None:
    """``rotate-key --retire`` refuses (exit 2, nothing changed) while a registered
    gateway has not applied the latest announcement, and the office keeps signing with the
    old key."""
    folder = tmp_path / "central"
    keygen(folder)
    with Central(folder, broker.host, broker.port) as central:
        central.add_gateway(GW, "b-1", KEY)
    assert cli(folder, broker, "rotate-key") == 0  # no agent: nobody applies it
    assert cli(folder, broker, "rotate-key", "--retire", "central-1") == 2
    assert set(load_trusted_keys(folder / TRUSTED_KEYS_NAME)) == {"central-1", "central-2"}
    with Central(folder, broker.host, broker.port) as central:
        assert central.signing_kid() == "central-1"
    assert cli(folder, broker, "rotate-key", "--retire", "central-2", "--force") == 0
    with Central(folder, broker.host, broker.port) as central:
        assert central.signing_kid() == "central-1"
    assert cli(folder, broker, "rotate-key", "--retire", "central-1", "--force") == 2


def test_a_gateway_that_missed_the_announcement_gets_it_from_its_status(
        broker: Broker, tmp_path: Path) -> None:
    """An announcement made while the gateway was away is sent to it again once its status
    shows a lower ``keys`` version, with no command from anyone, after which retiring the
    old key is no longer refused."""
    folder = tmp_path / "central"
    keygen(folder)
    with Central(folder, broker.host, broker.port) as central:
        central.add_gateway(GW, "b-1", KEY)
        central.enroll(GW, CARD_A, "P-1")
    assert cli(folder, broker, "rotate-key", "--kid", "central-2") == 0  # nobody listening
    serving = Serving(Central(folder, broker.host, broker.port, resync_interval_s=0.5),
                      heartbeat_every_s=1.0)
    office = serving.central
    (tmp_path / "gw").mkdir()
    gateway = Gateway(tmp_path / "gw", broker, folder / TRUSTED_KEYS_NAME)
    gateway.agent.start()
    try:
        announced, _held = office.key_rotation_state()
        wait_for(lambda: gateway.versions().get("keys") == announced,
                 "the announcement sent again after the gateway's status")
        wait_for(lambda: office.key_rotation_state()[1] == {GW: announced},
                 "the office sees it held")
        assert cli(folder, broker, "rotate-key", "--retire", "central-1") == 0
    finally:
        gateway.agent.stop()
        serving.stop()

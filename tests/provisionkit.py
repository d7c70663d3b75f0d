"""An office and gateways for the provisioning tests: the office's keys and site PKI
made by its own tools, gateways provisioned by ``agent.provision``, requests registered
through ``permitgate-central register-gateway``, and hand-made requests for the cases the
gateway's own tool never writes.

Not a test module: tests/test_provision.py, tests/test_register.py and
tests/test_provision_e2e.py use it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent import provision as prov
from protocol import bundles
from protocol.signing import b64
from provisioning import central_cli, pki
from provisioning.central import keygen

GW = "gw-0001"
SITE = "bldg-0001"


def make_office(folder: Path) -> Path:
    """An office folder with its keys and its site PKI in ``pki/`` (CA, broker certificate
    for localhost and 127.0.0.1, the office's client certificate)."""
    keygen(folder)
    assert pki.main(["init", str(folder / "pki"), "--broker-host", "localhost",
                     "--broker-host", "127.0.0.1"]) == 0
    return folder


def provision_gateway(folder: Path, gateway: str = GW, site: str = SITE, *,
                      port: int = 8883, store: str = "data/permitgate.db",
                      force: bool = False) -> prov.Provisioned:
    """A gateway provisioned in ``folder`` from the shipped example."""
    return prov.provision(folder, prov.Site(gateway, site, "localhost", port, store=store),
                          force=force)


def register(office: Path, request: Path, fingerprint: str, *args: str) -> tuple[int, str]:
    """``permitgate-central --dir OFFICE register-gateway REQUEST --fingerprint FP ARGS``:
    its exit status and what it printed."""
    out = io.StringIO()
    status = central_cli.main(["--dir", str(office), "register-gateway", str(request),
                               "--fingerprint", fingerprint, *args], out=out)
    return status, out.getvalue()


def hand_made_request(folder: Path, gateway: str, site: str = SITE, *,
                      common_name: str | None = None) -> tuple[Path, str]:
    """A request whose fingerprint holds, made without ``permitgate provision`` (which
    refuses such ids), with the CSR's CN ``common_name`` (default: the gateway id);
    returns its path and fingerprint."""
    tls = ec.generate_private_key(ec.SECP256R1())
    signing = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    seal = X25519PrivateKey.generate().public_key().public_bytes_raw()
    fingerprint = bundles.request_fingerprint(gateway, site,
                                              prov.tls_public_der(tls.public_key()),
                                              signing, seal)
    csr = prov.csr_for(tls, common_name or gateway)
    request = bundles.GatewayRequest(
        format=bundles.REQUEST_FORMAT, gateway_id=gateway, site_id=site,
        csr=csr.public_bytes(serialization.Encoding.PEM).decode(), signing_key=b64(signing),
        seal_key=b64(seal), fingerprint=fingerprint)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{gateway}.request.json"
    path.write_bytes(bundles.dump(request))
    return path, fingerprint


def edit_json(path: Path, **changes: object) -> None:
    """Change fields of a bundle file in place."""
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))

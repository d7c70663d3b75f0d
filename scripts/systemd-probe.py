"""Helpers of scripts/systemd-check.sh, run inside the booted Debian 12 container.

    systemd-probe.py seed DB KEYFILE CARD...   put CARDs on the allowlist, hashed under KEYFILE
    systemd-probe.py vcard UID [PORT]          a virtual card in vpcd's slot (root, unsandboxed)
    systemd-probe.py sandbox                   checks run inside the unit's own sandbox

``sandbox`` runs as the ``permitgate`` user under every hardening directive of
systemd/permitgate.service (scripts/systemd-check.sh copies them into a probe unit). It
first shows that the sandbox is really in force (a seccomp filter, no new privileges, a
write+execute mapping and a filtered system call refused), since a check that passes only
because nothing was enforced proves nothing; then it exercises what the agent loads:
CPython, cffi, cryptography (Ed25519, HPKE sealing), SQLite in WAL mode, gpiod, and pyscard
through the project's PC/SC driver against pcscd and vpcd. libosdp runs under the same
sandbox through tests/test_osdp.py (a second probe unit). Each line is ``ok NAME: ...``,
``info NAME: ...`` or ``FAIL NAME: ...``; the exit status is 1 when any line failed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if not (ROOT / "agent").is_dir():
    ROOT = Path("/opt/permitgate")  # copied out of the checkout: the installed agent's
sys.path.insert(0, str(ROOT))

VPCD_PORT = 35963
"""Debian vsmartcard-vpcd's first slot (/etc/reader.conf.d/vpcd: /dev/null:0x8C7B)."""
PCSC_READER = "Virtual PCD 00 00"
PCSC_UID = "04A1B2C3D4E5F6"

failures: list[str] = []


def report(status: str, name: str, detail: str) -> None:
    """Print one result line; remember failures."""
    if status == "FAIL":
        failures.append(name)
    print(f"{status} {name}: {detail}", flush=True)


def check(name: str, action: Callable[[], str]) -> None:
    """Run ``action``; its text is the ok detail, any exception a failure."""
    try:
        report("ok", name, action())
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the probe
        report("FAIL", name, f"{type(exc).__name__}: {exc}")


# -- is the sandbox in force? ----------------------------------------------------------


def status_fields() -> dict[str, str]:
    """``/proc/self/status`` as a dict."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def libc() -> ctypes.CDLL:
    """The C library, with errno kept."""
    return ctypes.CDLL(None, use_errno=True)


def write_exec_mapping_refused() -> str:
    """``MemoryDenyWriteExecute=yes``: an anonymous W+X mapping must fail with EPERM."""
    c = libc()
    c.mmap.restype = ctypes.c_void_p
    c.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
    prot = 0x1 | 0x2 | 0x4  # PROT_READ | PROT_WRITE | PROT_EXEC
    flags = 0x02 | 0x20  # MAP_PRIVATE | MAP_ANONYMOUS
    address = c.mmap(None, 4096, prot, flags, -1, 0)
    if address not in (None, ctypes.c_void_p(-1).value):
        raise AssertionError("a PROT_WRITE|PROT_EXEC mapping succeeded: "
                             "MemoryDenyWriteExecute is not in force")
    code = ctypes.get_errno()
    return f"mmap(PROT_WRITE|PROT_EXEC) refused with {errno.errorcode.get(code, code)}"


def filtered_syscalls_refused() -> str:
    """``SystemCallFilter=~@debug @resources``: ptrace and setpriority fail with EPERM."""
    c = libc()
    results = []
    for name, call in (("ptrace(PTRACE_TRACEME)", lambda: c.ptrace(0, 0, None, None)),
                       ("setpriority(+1)", lambda: c.setpriority(0, 0, 1))):
        ctypes.set_errno(0)
        if call() == 0:
            raise AssertionError(f"{name} succeeded: the system call filter is not in force")
        code = ctypes.get_errno()
        if code != errno.EPERM:
            raise AssertionError(f"{name} failed with {errno.errorcode.get(code, code)}, "
                                 "not EPERM (SystemCallErrorNumber=EPERM)")
        results.append(f"{name} -> EPERM")
    return ", ".join(results)


def sandbox_in_force() -> str:
    """Seccomp filter mode, no new privileges, no capabilities."""
    fields = status_fields()
    problems = []
    if fields.get("Seccomp") != "2":
        problems.append(f"Seccomp={fields.get('Seccomp')} (2 = filter)")
    if fields.get("NoNewPrivs") != "1":
        problems.append(f"NoNewPrivs={fields.get('NoNewPrivs')}")
    if int(fields.get("CapEff", "0"), 16) != 0:
        problems.append(f"CapEff={fields.get('CapEff')}")
    if problems:
        raise AssertionError("; ".join(problems))
    return (f"uid {os.getuid()}, Seccomp=2 with {fields.get('Seccomp_filters', '?')} "
            f"filters, NoNewPrivs=1, CapEff=0")


def device_policy() -> str:
    """``DevicePolicy=closed``: /dev/net/tun (not allowed) must not open. Informational:
    a container may not delegate the device controller."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except FileNotFoundError:
        return "/dev/net/tun absent in this container: not checked"
    except PermissionError as exc:
        return f"/dev/net/tun refused ({errno.errorcode.get(exc.errno or 0, exc.errno)})"
    os.close(fd)
    return "/dev/net/tun OPENED: the device policy is not enforced here"


# -- what the agent loads ------------------------------------------------------------


def python_runtime() -> str:
    """CPython starts, threads, and sockets of the allowed families work."""
    import threading  # noqa: PLC0415

    done = threading.Event()
    threading.Thread(target=done.set).start()
    if not done.wait(5):
        raise AssertionError("a thread did not run")
    a, b = socket.socketpair(socket.AF_UNIX)
    a.sendall(b"x")
    assert b.recv(1) == b"x"
    a.close()
    b.close()
    # IPAddressAllow=localhost: TCP over loopback (a local MQTT broker) still works.
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname(), timeout=5) as client:
        peer, _ = server.accept()
        with peer:
            client.sendall(b"y")
            assert peer.recv(1) == b"y"
    return (f"Python {platform.python_version()} on {platform.machine()}, threads, "
            "AF_UNIX, TCP on 127.0.0.1")


def cffi_calls() -> str:
    """cffi calls C in ABI mode, and a compiled API-mode module (argon2-cffi-bindings, the
    landlord page's password hashing) works; old-style ``ffi.callback()`` is reported
    separately (``cffi_callback``)."""
    import cffi  # noqa: PLC0415

    ffi = cffi.FFI()
    ffi.cdef("int abs(int);")
    if ffi.dlopen(None).abs(-7) != 7:
        raise AssertionError("abs(-7) != 7")
    text = f"cffi {cffi.__version__}: ABI-mode call"
    try:
        import argon2  # noqa: PLC0415
    except ImportError:
        return text + "; argon2-cffi not installed (API-mode module not checked)"
    hasher = argon2.PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    if not hasher.verify(hasher.hash("probe"), "probe"):
        raise AssertionError("argon2 verify failed")
    return text + "; API-mode module _argon2_cffi_bindings hashed and verified"


def cffi_callback() -> str:
    """Old-style ``ffi.callback()`` needs write+execute memory (cffi's documented limit
    under MemoryDenyWriteExecute); which installed packages call it at all."""
    import cffi  # noqa: PLC0415

    ffi = cffi.FFI()
    ffi.cdef("void qsort(void *, size_t, size_t, int (*)(const void *, const void *));")
    users = sorted({str(path.relative_to(site)).split("/")[0]
                    for site in map(Path, sys.path) if site.name == "site-packages"
                    for path in site.rglob("*.py")
                    if "/cffi/" not in str(path) and "ffi.callback(" in path.read_text(
                        errors="replace")})
    used = f"packages calling ffi.callback(): {', '.join(users) or 'none'}"
    try:
        @ffi.callback("int(const void *, const void *)")
        def compare(a: object, b: object) -> int:
            x, y = ffi.cast("int *", a)[0], ffi.cast("int *", b)[0]
            return int((x > y) - (x < y))
    except MemoryError as exc:
        return f"refused ({exc.args[0].split('.')[0]}); {used}"
    values = ffi.new("int[]", [5, 3, 9, 1])
    ffi.dlopen(None).qsort(values, 4, ffi.sizeof("int"), compare)
    return f"worked, sorted {list(values)}; {used}"


def ctypes_callback() -> str:
    """A ctypes callback (libffi closure) through qsort."""
    c = libc()
    compare_t = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                                 ctypes.POINTER(ctypes.c_int))
    array = (ctypes.c_int * 4)(5, 3, 9, 1)
    c.qsort(array, 4, ctypes.sizeof(ctypes.c_int),
            compare_t(lambda a, b: (a[0] > b[0]) - (a[0] < b[0])))
    if list(array) != [1, 3, 5, 9]:
        raise AssertionError(f"qsort gave {list(array)}")
    return "ctypes CFUNCTYPE callback through qsort sorted [5, 3, 9, 1]"


def cryptography_works() -> str:
    """Ed25519 (the sync protocol's signatures), HPKE sealing, AES-GCM."""
    import cryptography  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PrivateKey,
    )
    from cryptography.hazmat.primitives.asymmetric.x25519 import (  # noqa: PLC0415
        X25519PrivateKey,
    )
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415

    from protocol.sealing import seal, unseal  # noqa: PLC0415

    key = Ed25519PrivateKey.generate()
    key.public_key().verify(key.sign(b"list"), b"list")
    box = X25519PrivateKey.generate()
    sealed = seal(box.public_key(), "P301", gateway="gw", enrollment_id="e1")
    if unseal(box, sealed, gateway="gw", enrollment_id="e1") != "P301":
        raise AssertionError("HPKE round trip changed the text")
    aes = AESGCM(AESGCM.generate_key(bit_length=128))
    nonce = os.urandom(12)
    assert aes.decrypt(nonce, aes.encrypt(nonce, b"x", None), None) == b"x"
    return f"cryptography {cryptography.__version__}: Ed25519, HPKE seal/unseal, AES-GCM"


def sqlite_wal() -> str:
    """The store opens in WAL mode with synchronous=FULL and commits."""
    from agent.store import CredentialEntry, Store  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as folder:
        store = Store(Path(folder) / "probe.db")
        store.replace_allowlist([CredentialEntry(os.urandom(32)) for _ in range(100)], 1)
        store.close()
        with sqlite3.connect(Path(folder) / "probe.db") as db:
            mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    return f"SQLite {sqlite3.sqlite_version}, journal_mode={mode}, 100 entries committed"


def pcsc_read() -> str:
    """pyscard through the project's PC/SC driver: pcscd, vpcd and a virtual card."""
    from drivers import registry  # noqa: PLC0415

    reader = registry.create("reader", "pcsc", "probe-pcsc", {"reader": PCSC_READER})
    reader.open()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            read = reader.read(1.0)
            if read is not None:
                if read.card_id != f"uid:{PCSC_UID}":
                    raise AssertionError(f"read {read.card_id}, expected uid:{PCSC_UID}")
                from importlib.metadata import version  # noqa: PLC0415

                return f"pyscard {version('pyscard')}: read uid:{PCSC_UID} at '{PCSC_READER}'"
        raise AssertionError("no card read within 30 s")
    finally:
        reader.close()


def libosdp_loads() -> str:
    """libosdp's modules load and number their constants as the driver expects (its
    exchange with a PD runs in the test probe unit)."""
    from importlib.metadata import version  # noqa: PLC0415

    from drivers.osdp.link import libosdp  # noqa: PLC0415

    libosdp()
    return f"libosdp {version('libosdp')} imported, constants checked"


def gpiod_loads() -> str:
    """libgpiod's Python binding (``permitgate[gpio]``) loads and calls into C."""
    from importlib.metadata import version  # noqa: PLC0415

    import gpiod  # type: ignore[import-not-found]  # noqa: PLC0415

    if gpiod.is_gpiochip_device("/dev/null"):
        raise AssertionError("/dev/null taken for a GPIO chip")
    return f"gpiod {version('gpiod')} imported, is_gpiochip_device() answered"


def sandbox() -> int:
    """Every check, in order; 1 when any failed."""
    check("sandbox", sandbox_in_force)
    check("memory-deny-write-execute", write_exec_mapping_refused)
    check("syscall-filter", filtered_syscalls_refused)
    report("info", "device-policy", device_policy())
    check("python", python_runtime)
    check("cffi", cffi_calls)
    report("info", "cffi-callback", cffi_callback())
    try:
        report("info", "ctypes-callback", ctypes_callback())
    except Exception as exc:  # noqa: BLE001 - informational: the agent has no ctypes callback
        report("info", "ctypes-callback", f"{type(exc).__name__}: {exc}")
    check("cryptography", cryptography_works)
    check("sqlite", sqlite_wal)
    check("libosdp", libosdp_loads)
    check("gpiod", gpiod_loads)
    check("pyscard", pcsc_read)
    return 1 if failures else 0


# -- helpers outside the sandbox ---------------------------------------------------------


def seed(db: Path, keyfile: Path, cards: list[str]) -> int:
    """Put ``cards`` on the allowlist, hashed under the site key in ``keyfile``."""
    from agent.keys import load_site_key  # noqa: PLC0415
    from agent.store import CredentialEntry, Store  # noqa: PLC0415
    from protocol.hashing import CredentialHasher  # noqa: PLC0415

    hasher = CredentialHasher(load_site_key(keyfile))
    store = Store(db)
    store.replace_allowlist([CredentialEntry(hasher.credential(card)) for card in cards], 1)
    store.close()
    print(f"seeded {len(cards)} card(s) into {db}")
    return 0


def vcard(uid: str, port: int) -> int:
    """Keep a virtual card in vpcd's slot: connect when pcscd loads vpcd, again after it
    goes (pcscd exits when idle). Runs until killed."""
    from tests.vcard import VirtualCard  # noqa: PLC0415

    marker = Path("/run/pgcheck-vcard.connected")
    while True:
        card = VirtualCard(port, bytes.fromhex(uid))
        try:
            card.insert()
        except OSError:
            time.sleep(0.2)
            continue
        marker.write_text(f"{time.time()}\n")
        while card._sock is not None and card._thread is not None and card._thread.is_alive():  # noqa: SLF001
            time.sleep(0.2)
        card.remove()


def main(argv: list[str]) -> int:
    """Dispatch on the first argument."""
    if argv[:1] == ["sandbox"]:
        return sandbox()
    if argv[:1] == ["seed"] and len(argv) >= 4:
        return seed(Path(argv[1]), Path(argv[2]), argv[3:])
    if argv[:1] == ["vcard"] and len(argv) in (2, 3):
        return vcard(argv[1], int(argv[2]) if len(argv) == 3 else VPCD_PORT)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

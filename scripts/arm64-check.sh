#!/usr/bin/env bash
# Shows that the install path works on arm64 (Raspberry Pi OS Bookworm 64-bit is Debian 12
# arm64 with Python 3.11): a debootstrapped Debian 12 arm64 root, run through
# qemu-user-static (binfmt_misc) in a chroot, where
#
#   arch       the root's Python reports aarch64
#   demo       the README's first command, ./permitgate demo, builds .venv from PyPI and runs
#   install    provisioning/install.sh, run under umask 077, installs to /opt/permitgate
#              (venv, user, config, key) and the permitgate user can run what it installed
#   dev-deps   the test dependencies (pip install -e '.[dev]', extras included) install
#   tests      tests/test_decision.py tests/test_store.py tests/test_protocol.py
#              tests/test_permits.py pass (or the files given as arguments)
#   wheels     every package built from source here (no arm64 wheel on PyPI) is named
#
# Usage: sudo scripts/arm64-check.sh [--head] [--keep] [TEST_FILE...]   (about 12 minutes:
# emulation is slow, which is why this is not part of CI; the first run also debootstraps,
# about 5 minutes more). It installs the work tree as it is, or with --head the last
# commit (git archive HEAD).
# Needs: root, Linux with binfmt_misc, the Debian packages debootstrap and
# qemu-user-static (installed if missing), and the Debian archive and PyPI over the
# network. binfmt_misc is mounted and qemu-aarch64 registered if they are not; both are
# undone at the end if this script did them. Artefacts stay under $PERMITGATE_CHECK_DIR
# (/var/tmp/permitgate-check): base-arm64 (pristine root, reused), arm64-root (this run's
# copy, removed at the end unless --keep) and arm64-logs/.
# Exit status: 0 all passed, 1 a check failed, 2 the check could not run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/check-lib.sh
. "$here/scripts/check-lib.sh"
keep=""
from_head=""
tests=()
for arg in "$@"; do
    case "$arg" in
        --keep) keep=1 ;;
        --head) from_head=1 ;;
        -*) die "unknown option '$arg' (--keep, --head)" ;;
        *) tests+=("$arg") ;;
    esac
done
[ ${#tests[@]} -gt 0 ] || tests=(tests/test_decision.py tests/test_store.py tests/test_protocol.py tests/test_permits.py)

# pyscard (the pcsc extra, in .[dev]) has no Linux wheel: gcc, swig, libpcsclite-dev and
# python3-dev build it, as on a Pi (docs/hardware.md).
include="python3,python3-venv,adduser,tzdata,gcc,libc6-dev,python3-dev,swig,libpcsclite-dev"
root="$check_dir/arm64-root"
logs="$check_dir/arm64-logs"
src=/root/permitgate

need_root
[ "$(uname -s)" = Linux ] || die "needs Linux"
host_packages debootstrap qemu-user-static
say "arm64-check of $(checkout_id "$here") on $(uname -srm)"

mounted_binfmt=""
registered=""
binfmt=/proc/sys/fs/binfmt_misc
if ! mountpoint -q "$binfmt"; then
    mount -t binfmt_misc binfmt_misc "$binfmt" || die "cannot mount binfmt_misc at $binfmt"
    mounted_binfmt=1
    say "mounted binfmt_misc at $binfmt (unmounted again at the end)"
fi
if [ ! -e "$binfmt/qemu-aarch64" ]; then
    conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    [ -f "$conf" ] || die "$conf missing (qemu-user-static)"
    cat "$conf" >"$binfmt/register" || die "cannot register qemu-aarch64 with binfmt_misc"
    registered=1
    say "registered qemu-aarch64 from $conf (unregistered again at the end)"
fi
say "binfmt_misc: qemu-aarch64 $(head -1 "$binfmt/qemu-aarch64"), $(grep ^interpreter "$binfmt/qemu-aarch64")"

cleanup() {
    set +e
    if [ -d "$root" ]; then
        unmount_under "$root"
        [ -n "$keep" ] || rm -rf "$root"
    fi
    # Only what this run did is undone, and not while another root still uses it.
    if [ -n "$registered" ] && [ -z "$keep" ]; then echo -1 >"$binfmt/qemu-aarch64"; fi
    if [ -n "$mounted_binfmt" ] && [ -z "$keep" ]; then umount "$binfmt"; fi
}
trap cleanup EXIT

base="$(base_root arm64 "$include")"
fresh_copy "$base" "$root"
rm -rf "$logs"
mkdir -p "$logs"
registry_access "$root"
copy_checkout "$here" "$root$src"
# A private /dev (no host device nodes inside the root) with its own pty instance: the
# demo and the tests use pseudo-terminals.
mount -t proc proc "$root/proc"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$root/dev"
while read -r name major minor; do
    mknod -m 0666 "$root/dev/$name" c "$major" "$minor"
done <<'EOF'
null 1 3
zero 1 5
full 1 7
random 1 8
urandom 1 9
tty 5 0
EOF
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t tmpfs tmpfs "$root/dev/shm"
mount -t tmpfs tmpfs "$root/tmp"

# in_root CMD...: run CMD inside the arm64 root with a clean environment.
in_root() {
    chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 TERM=dumb DEBIAN_FRONTEND=noninteractive "$@"
}
timed() {  # timed LOG CMD...: run CMD in the root from the checkout, output to LOG
    local log="$1"; shift
    local started=$SECONDS status=0
    in_root /bin/sh -c "cd $src && exec \"\$@\"" sh "$@" >"$log" 2>&1 || status=$?
    elapsed=$((SECONDS - started))
    return "$status"
}

machine="$(in_root python3 -c 'import platform, sys; print(platform.machine(), sys.version.split()[0])')"
debian="$(cat "$root/etc/debian_version")"
case "$machine" in
    aarch64*) pass arch "Debian $debian arm64 root, python3: $machine (qemu-user-static via binfmt_misc)" ;;
    *) fail arch "python3 in the root reports '$machine'"; exit 1 ;;
esac

# The README's first command, from a checkout: sets up .venv (PyPI) and runs the demo.
say "./permitgate demo (creates .venv from PyPI under emulation)"
if timed "$logs/demo.log" ./permitgate demo; then
    if grep -q "OPEN .*granted" "$logs/demo.log" && grep -q "DENIED .*unknown_card" "$logs/demo.log"; then
        pass demo "./permitgate demo in ${elapsed} s (first run includes building .venv); $(grep -c -E '^ *(OPEN|DENIED) ' "$logs/demo.log") decisions printed"
    else
        fail demo "ran but printed no granted and unknown_card decisions (log: $logs/demo.log)"
    fi
    grep -E '^ *(OPEN|DENIED) ' "$logs/demo.log" | sed 's/^/  /'
else
    fail demo "exit $? after ${elapsed} s: $(tail -5 "$logs/demo.log")"
fi

# The gateway install path: a key as the office would issue it, the example configuration.
say "umask 077; provisioning/install.sh --config config/permitgate.example.toml --site-key ..."
in_root /bin/sh -c "umask 077; python3 -c 'import os; print(os.urandom(32).hex())' >/root/office.key"
# Under umask 077, as in a hardened root shell; then the service user runs the installed
# agent (check-config) to show it can read what was installed.
if timed "$logs/install.log" /bin/sh -c 'umask 077; exec "$@"' sh provisioning/install.sh \
        --config config/permitgate.example.toml --site-key /root/office.key \
        && as_user="$(in_root runuser -u permitgate -- /opt/permitgate/.venv/bin/permitgate \
            check-config -c /etc/permitgate/permitgate.toml 2>&1 | head -1)" \
        && case "$as_user" in *": OK"*) true ;; *) false ;; esac; then
    pass install "install.sh (umask 077) in ${elapsed} s: $(tail -1 "$logs/install.log"); $(in_root id permitgate); as permitgate: $as_user"
else
    fail install "after ${elapsed} s: $(tail -5 "$logs/install.log") ${as_user:-}"
fi

# The test dependencies, output kept to see what pip builds from source.
say "pip install -e '.[dev]' (extras and test tools; pyscard compiles under emulation)"
if timed "$logs/dev-deps.log" .venv/bin/pip install -e '.[dev]'; then
    pass dev-deps "in ${elapsed} s"
else
    fail dev-deps "exit $? after ${elapsed} s: $(tail -5 "$logs/dev-deps.log")"
fi

say "pytest ${tests[*]}"
if timed "$logs/tests.log" .venv/bin/python -m pytest -p no:cacheprovider -q "${tests[@]}"; then
    pass tests "$(grep -E '[0-9]+ passed' "$logs/tests.log" | tail -1) in ${elapsed} s: ${tests[*]}"
else
    fail tests "$(grep -E '[0-9]+ (passed|failed)|^FAILED|^ERROR' "$logs/tests.log" | tail -12 | tr '\n' ';')"
fi

# Which packages had no arm64 wheel: pip keeps every wheel it built from an sdist in its
# wheel cache (downloaded wheels are not there).
built="$(find "$root/root/.cache/pip/wheels" -name '*.whl' -printf '%f\n' 2>/dev/null | sort -u | tr '\n' ' ')"
building="$(grep -hoE 'Building wheel for [^ ]+' "$logs"/*.log | sort -u | sed 's/Building wheel for //' | tr '\n' ' ')"
pass wheels "built from source here (no arm64 wheel used): ${built:-none} ${building:+(pip: $building)}"
in_root "$src/.venv/bin/pip" list --format=freeze >"$logs/pip-freeze.txt" 2>/dev/null || true
for dist in "$root$src"/.venv/lib/python3*/site-packages/*.dist-info; do
    tag="$(sed -n 's/^Tag: //p' "$dist/WHEEL" 2>/dev/null | head -1)"
    printf '%s %s\n' "$(basename "$dist" .dist-info)" "${tag:-?}"
done >"$logs/wheel-tags.txt"
say "  platform wheels: $(grep -E 'aarch64' "$logs/wheel-tags.txt" | tr '\n' ';')"
say "logs: $logs"
summary arm64-check

#!/usr/bin/env bash
# Runs systemd/permitgate.service under a real systemd: boots a debootstrapped Debian 12
# (amd64) with systemd-nspawn, installs this checkout with provisioning/install.sh inside
# it, starts the unit and checks, printing one PASS/FAIL line each:
#
#   boot              Debian 12's systemd boots to multi-user.target in the container
#   install           provisioning/install.sh, run under umask 077, succeeds (venv, user,
#                     config, key, unit)
#   notify-active     `systemctl start` returns (READY=1) and the unit is active/running
#   credential        LoadCredential= delivers the site key: the agent grants a card hashed
#                     under it, and the key exists nowhere the agent could read it otherwise
#   sandbox-probe     under every hardening directive of the unit (a copy of its [Service]
#                     section, only ExecStart/Type changed): the filter and
#                     MemoryDenyWriteExecute are in force, and Python, cffi, cryptography,
#                     SQLite, libosdp and pyscard (through pcscd + vpcd) work
#   sandbox-tests     tests/test_osdp.py and tests/test_sealing.py pass in the same sandbox
#   exec-stop-post    after SIGKILL of the agent, ExecStopPost= puts each relay in its
#                     door's safe state (simulated relays with state files, read from here)
#   watchdog          a frozen agent (SIGSTOP) is killed by the watchdog and restarted
#   exposure          `systemd-analyze security` inside the container: <= 1.5
#   upgrade           install.sh of a second release (this checkout, version bumped, in a
#                     copy) over the running service: active again on the new release,
#                     the link moved, `permitgate status` reports the new version, the
#                     store migrated and its copy kept, events, configuration and key kept
#                     (scripts/systemd-upgrade.sh)
#   rollback          install.sh of a third release (with a store migration) whose agent
#                     exits 1 at start: it rolls back, the store copy put back, the
#                     service is active on the second release, the link back
#   rollback-late     the same for a fourth release whose agent exits 1 three seconds
#                     after it is ready (after `systemctl start` succeeded)
#   stop              `systemctl stop` ends the agent (the second release's) within
#                     TimeoutStopSec, relays safe
# It also prints, uncounted, what systemd 252 does with a LoadCredential= of a file that
# does not exist (load-credential-missing).
#
# Usage: sudo scripts/systemd-check.sh [--head] [--keep]   (about 6 minutes after the
# first run; the first run also debootstraps a Debian 12 root, about 2 minutes more)
# It installs the work tree as it is, or with --head the last commit (git archive HEAD).
# Needs: root, Linux, the Debian packages debootstrap, systemd-container and dbus (it
# installs them), and the Debian archive and PyPI over the network. The host needs no
# systemd as PID 1: a system D-Bus is started on the host for systemd-nspawn if none runs,
# and stopped again. Build artefacts stay under $PERMITGATE_CHECK_DIR
# (/var/tmp/permitgate-check): base-amd64 (pristine root, reused), systemd-root (this run's
# copy) and systemd-logs/ (install log, probe output, journal). --keep leaves the
# container's root as it was at the end (it is always removed at the start of a run).
# Exit status: 0 all passed, 1 a check failed, 2 the check could not run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/check-lib.sh
. "$here/scripts/check-lib.sh"
keep=""
from_head=""
for arg in "$@"; do
    case "$arg" in
        --keep) keep=1 ;;
        --head) from_head=1 ;;
        *) die "unknown argument '$arg' (--keep, --head)" ;;
    esac
done

include="systemd,systemd-sysv,dbus,python3,python3-venv,adduser,tzdata"
# pyscard has no Linux wheel: it builds with gcc, swig and libpcsclite-dev. pcscd and
# vsmartcard-vpcd give the PC/SC probe a reader.
include="$include,gcc,libc6-dev,python3-dev,swig,libpcsclite-dev,pcscd,vsmartcard-vpcd"
root="$check_dir/systemd-root"
logs="$check_dir/systemd-logs"
card=em4100:67003B51C6
max_exposure=1.5

need_root
[ "$(uname -s)" = Linux ] || die "needs Linux"
host_packages debootstrap systemd-container dbus
say "systemd-check of $(checkout_id "$here") on $(uname -srm)"

base="$(base_root amd64 "$include")"
fresh_copy "$base" "$root"
rm -rf "$logs"
mkdir -p "$logs"
registry_access "$root"
copy_checkout "$here" "$root/root/permitgate-src"
# The probe comes from this script's own folder, whichever source is installed; the
# permitgate user must be able to read it (ProtectHome= hides /root).
probe=/usr/local/lib/permitgate-check/systemd-probe.py
install -D -m 0644 "$here/scripts/systemd-probe.py" "$root$probe"
echo pgcheck >"$root/etc/hostname"
install -d -m 0700 "$root/root/pg-check"
# A test building: "front" locks when safe (fail_mode secure), "gate" opens (fail_mode
# safe); both relays mirror their state to a file under the state directory.
cat >"$root/root/pg-check/permitgate.toml" <<'EOF'
[site]
site_id = "check-site"
gateway_id = "check-gw"
timezone = "UTC"

[store]
path = "/var/lib/permitgate/permitgate.db"

[keys]
site_key = "site.key"

[[doors]]
id = "front"
unlock_s = 120
fail_mode = "secure"
relay = { driver = "simulated", options = { state_file = "/var/lib/permitgate/relay-front.json" } }

[[doors]]
id = "gate"
unlock_s = 5
fail_mode = "safe"
relay = { driver = "simulated", options = { state_file = "/var/lib/permitgate/relay-gate.json" } }

[[readers]]
id = "front-in"
door = "front"
direction = "entry"
driver = "simulated"
EOF
(umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$root/root/pg-check/site.key"; echo >>"$root/root/pg-check/site.key")

# -- boot --------------------------------------------------------------------------------
dbus_pid=""
nspawn_pid=""
init_pid=""
cleanup() {
    set +e
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        # SIGTERM asks the container's systemd to power off.
        kill -TERM "$nspawn_pid"
        for _ in $(seq 60); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$nspawn_pid" 2>/dev/null && kill -KILL "$nspawn_pid"
        wait "$nspawn_pid" 2>/dev/null
        say "container stopped"
    fi
    if [ -n "$dbus_pid" ]; then
        kill "$dbus_pid" 2>/dev/null && say "host D-Bus daemon (pid $dbus_pid) stopped"
        sleep 0.2
        rm -f /run/dbus/pid /run/dbus/system_bus_socket
    fi
    [ -n "$keep" ] || rm -rf "$root"
}
trap cleanup EXIT

if ! busctl --system status >/dev/null 2>&1; then
    mkdir -p /run/dbus
    rm -f /run/dbus/system_bus_socket /run/dbus/pid
    dbus_pid="$(dbus-daemon --system --fork --print-pid)"
    say "started a system D-Bus on the host (pid $dbus_pid): systemd-nspawn asks for one"
fi
say "booting: systemd-nspawn --register=no --keep-unit -D $root -b"
systemd-nspawn --register=no --keep-unit --machine=pgcheck --console=passive -D "$root" -b \
    </dev/null >"$logs/nspawn.log" 2>&1 &
nspawn_pid=$!
for _ in $(seq 100); do
    for child in $(pgrep -P "$nspawn_pid" || true); do
        [ "$(cat "/proc/$child/comm" 2>/dev/null)" = systemd ] && init_pid=$child
    done
    [ -n "$init_pid" ] && break
    kill -0 "$nspawn_pid" 2>/dev/null || break
    sleep 0.2
done
[ -n "$init_pid" ] || { cat "$logs/nspawn.log"; die "the container's systemd did not start"; }

# ct CMD...: run CMD inside the container (its namespaces and root), as root.
ct() {
    nsenter --target "$init_pid" --mount --uts --ipc --net --pid --root --wd -- \
        env -i -C / PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 SYSTEMD_PAGER=cat SYSTEMD_COLORS=0 "$@"
}
prop() { ct systemctl show -P "$1" permitgate.service; }
cursor() { ct journalctl --show-cursor -n 0 -q | sed -n 's/^-- cursor: //p'; }
journal_since() { ct journalctl -q --no-pager -o short-monotonic --after-cursor="$1" "${@:2}"; }
relay() {  # relay DOOR: true/false/absent, as the simulated relay last wrote it
    local file="$root/var/lib/permitgate/relay-$1.json"
    [ -f "$file" ] || { echo absent; return; }
    python3 -c 'import json,sys; print(str(json.load(open(sys.argv[1]))["unlocked"]).lower())' "$file" 2>/dev/null || echo unreadable
}

# The manager answers on its private socket shortly after it starts; then wait for boot.
state=""
for _ in $(seq 90); do
    state="$(ct timeout 180 systemctl is-system-running --wait 2>/dev/null || true)"
    [ -n "$state" ] && break
    sleep 1
done
version="$(ct systemctl --version | head -1)"
if [ "$state" = running ] || [ "$state" = degraded ]; then
    pass boot "$version, PID 1 in the container; system state '$state'"
    [ "$state" = degraded ] && say "  failed units: $(ct systemctl --failed --plain --no-legend | awk '{print $1}' | tr '\n' ' ')"
else
    fail boot "system state '$state' ($version)"
    ct systemctl --failed --no-pager || true
    exit 1
fi

# -- install -----------------------------------------------------------------------------
# Under umask 077, as in a hardened root shell: what it installs must still be readable by
# the service user (an install under that umask once failed with 203/EXEC).
say "umask 077; provisioning/install.sh --config ... --site-key ... (builds the venv from PyPI)"
if ct /bin/sh -c 'umask 077; exec "$@"' sh /root/permitgate-src/provisioning/install.sh \
        --config /root/pg-check/permitgate.toml --site-key /root/pg-check/site.key \
        >"$logs/install.log" 2>&1; then
    pass install "$(tail -1 "$logs/install.log"); unit at /etc/systemd/system/permitgate.service, $(ct id permitgate); $(ct stat -L -c '%n %a' /opt/permitgate /opt/permitgate/.venv/bin/permitgate /etc/permitgate/credentials/site.key | tr '\n' ' ')"
else
    fail install "exit $?: $(tail -5 "$logs/install.log")"
    exit 1
fi
# The probes' extras (docs/hardware.md), installed as there: libosdp, pyscard (built from
# source), gpiod (tests/test_osdp.py imports the GPIO test chip), cffi and argon2-cffi (an API-mode cffi module), and the test runner for the
# sandboxed probes.
say "pip install -e '/opt/permitgate[osdp,pcsc,gpio]' cffi argon2-cffi pytest pytest-timeout hypothesis"
if ! ct /opt/permitgate/.venv/bin/pip install -e '/opt/permitgate[osdp,pcsc,gpio]' cffi argon2-cffi pytest \
        pytest-timeout hypothesis >"$logs/extras.log" 2>&1; then
    fail extras "$(tail -5 "$logs/extras.log")"
fi
grep -E "Building wheel for .*finished|Created wheel for|Successfully installed" "$logs/extras.log" | sed 's/^/  /' || true

# Seed the allowlist with one card hashed under the site key, before the first start.
ct install -d -o permitgate -g permitgate -m 0700 /var/lib/permitgate
ct /opt/permitgate/.venv/bin/python $probe seed \
    /var/lib/permitgate/permitgate.db /etc/permitgate/credentials/site.key "$card" >/dev/null
ct chown -R permitgate:permitgate /var/lib/permitgate

# -- start under Type=notify -------------------------------------------------------------
mark="$(cursor)"
started=$SECONDS
if ct timeout 120 systemctl start permitgate.service; then
    took=$((SECONDS - started))
    active="$(prop ActiveState)/$(prop SubState)"
    if [ "$active" = active/running ] && [ "$(prop Type)" = notify ]; then
        pass notify-active "systemctl start returned after ${took} s; Type=$(prop Type), $active, MainPID $(prop MainPID), WatchdogUSec=$(prop WatchdogUSec)"
    else
        fail notify-active "state $active, Type=$(prop Type)"
    fi
else
    fail notify-active "systemctl start failed: $(prop ActiveState)/$(prop SubState) $(prop Result)"
    journal_since "$mark" -u permitgate.service | tail -30
    exit 1
fi

# What this container can enforce besides seccomp and namespaces (informational): the
# device policy needs the devices controller (cgroup v1 here) or cgroup v2 BPF, the IP
# firewall BPF on the unified hierarchy.
cgroup="$(prop ControlGroup)"
devices="$(ct cat "/sys/fs/cgroup/devices$cgroup/devices.list" 2>/dev/null | tr '\n' ' ' || true)"
[ -n "$devices" ] || devices="none (no devices controller for the unit)"
say "  cgroups in the container: $(ct stat -f -c %T /sys/fs/cgroup) at /sys/fs/cgroup; devices.list of the unit: $devices"
firewall="$(ct journalctl -q --no-pager -b -o cat | grep -i 'firewall' | head -2 | tr '\n' ' ' || true)"
[ -n "$firewall" ] || firewall="no complaint about BPF/cgroup firewalling in the journal of the container"
say "  IP firewall: $firewall"

# -- LoadCredential ----------------------------------------------------------------------
main_pid="$(prop MainPID)"
creds="$(ct cat "/proc/$main_pid/environ" | tr '\0' '\n' | sed -n 's/^CREDENTIALS_DIRECTORY=//p')"
problems=""
[ "$creds" = /run/credentials/permitgate.service ] || problems="$problems CREDENTIALS_DIRECTORY='$creds';"
if ! ct cmp -s /etc/permitgate/credentials/site.key "$creds/site.key"; then
    problems="$problems $creds/site.key differs from or lacks the installed key;"
fi
cred_ls="$(ct stat -c '%U %a %n' "$creds/site.key" 2>&1 || true)"
others="$(ct find / -xdev -name site.key -not -path '/etc/permitgate/credentials/*' \
    -not -path '/run/credentials/*' -not -path '/root/*' 2>/dev/null | tr '\n' ' ')"
[ -z "$others" ] || problems="$problems other copies of the key: $others;"
granted="$(ct /opt/permitgate/.venv/bin/permitgate sim tap front-in "$card" -c /etc/permitgate/permitgate.toml 2>&1 || true)"
unknown="$(ct /opt/permitgate/.venv/bin/permitgate sim tap front-in em4100:DEADBEEF00 -c /etc/permitgate/permitgate.toml 2>&1 || true)"
case "$granted" in "OPEN"*granted*) ;; *) problems="$problems card under the key: '$granted';" ;; esac
case "$unknown" in DENIED*unknown_card*) ;; *) problems="$problems unknown card: '$unknown';" ;; esac
if [ -z "$problems" ]; then
    pass credential "CREDENTIALS_DIRECTORY=$creds ($cred_ls), same bytes as /etc/permitgate/credentials/site.key, no other copy; card hashed under it: '$granted'; unknown card: '$unknown'"
else
    fail credential "$problems"
fi

# -- the sandbox: a probe unit with the unit's own hardening -----------------------------
# probe_unit NAME EXEC: NAME.service = permitgate.service's [Service] lines minus how the
# agent is started, supervised and stopped, running EXEC once as the permitgate user.
probe_unit() {
    {
        printf '[Unit]\nDescription=permitgate sandbox probe (%s)\n\n[Service]\n' "$1"
        awk '/^\[/{section=$0; next}
             section=="[Service]" && /^[A-Za-z]/ &&
             !/^(Type|NotifyAccess|ExecStart|ExecStopPost|Restart|RestartSec|TimeoutStopSec|WatchdogSec)=/' \
            "$root/etc/systemd/system/permitgate.service"
        printf 'Type=oneshot\nExecStart=%s\nWorkingDirectory=/tmp\n' "$2"
        printf 'Environment=PYTHONDONTWRITEBYTECODE=1 HOME=/tmp\nTimeoutStartSec=900\n'
    } >"$root/etc/systemd/system/$1.service"
}
run_probe() {  # run_probe NAME: start it, keep its output; 0 when it succeeded
    ct systemctl daemon-reload
    ct timeout 900 systemctl start "$1.service" >/dev/null 2>&1 || true
    ct journalctl -q --no-pager -o cat -u "$1.service" >"$logs/$1.txt"
    [ "$(ct systemctl show -P Result "$1.service")" = success ]
}
probe_unit permitgate-probe "/opt/permitgate/.venv/bin/python $probe sandbox"
diff <(grep -v '^#' "$root/etc/systemd/system/permitgate.service" | grep -E '^[A-Z]' | sort) \
     <(grep -E '^[A-Z]' "$root/etc/systemd/system/permitgate-probe.service" | sort) \
     >"$logs/probe-unit.diff" || true
# pcscd (socket-activated in Debian) with vpcd, and a virtual card outside the sandbox.
ct systemctl start pcscd.service
ct systemd-run --quiet --unit=pgcheck-vcard -p WorkingDirectory=/opt/permitgate \
    /opt/permitgate/.venv/bin/python $probe vcard 04A1B2C3D4E5F6
for _ in $(seq 50); do ct test -f /run/pgcheck-vcard.connected && break; sleep 0.2; done
changed="$(grep -E '^[<>] [A-Za-z]+=' "$logs/probe-unit.diff" | sed 's/^[<>] //; s/=.*//' | sort -u | tr '\n' ' ')"
say "  keys that differ between the probe unit and permitgate.service (any section): $changed"
if run_probe permitgate-probe; then
    pass sandbox-probe "$(grep -c '^ok ' "$logs/permitgate-probe.txt") checks ok under the unit's hardening (output below)"
else
    fail sandbox-probe "Result=$(ct systemctl show -P Result permitgate-probe.service) (output below)"
fi
grep -E '^(ok|info|FAIL) ' "$logs/permitgate-probe.txt" | sed 's/^/  /' || tail -20 "$logs/permitgate-probe.txt"
ct systemctl stop pgcheck-vcard.service || true

probe_unit permitgate-probe-tests "/opt/permitgate/.venv/bin/python -m pytest -p no:cacheprovider -q --rootdir=/opt/permitgate -c /opt/permitgate/pyproject.toml /opt/permitgate/tests/test_osdp.py /opt/permitgate/tests/test_sealing.py"
if run_probe permitgate-probe-tests; then
    pass sandbox-tests "$(grep -E '[0-9]+ passed' "$logs/permitgate-probe-tests.txt" | tail -1) (tests/test_osdp.py with libosdp's own PD, tests/test_sealing.py) under the unit's hardening"
else
    fail sandbox-tests "$(tail -15 "$logs/permitgate-probe-tests.txt")"
fi

# -- ExecStopPost after SIGKILL ----------------------------------------------------------
# The tap above unlocked "front" for 120 s. SIGKILL gives the agent no chance to lock it:
# only ExecStopPost= can, before the restart 2 s (RestartSec) later.
before="front=$(relay front) gate=$(relay gate)"
restarts="$(prop NRestarts)"
old_pid="$(prop MainPID)"
mark="$(cursor)"
ct systemctl kill --kill-whom=main --signal=SIGKILL permitgate.service
seen=""
for i in $(seq 100); do
    if [ "$(relay front)" = false ] && [ "$(relay gate)" = true ]; then
        seen="after $((i * 100)) ms"
        break
    fi
    sleep 0.1
done
for _ in $(seq 60); do
    [ "$(prop NRestarts)" -gt "$restarts" ] && [ "$(prop ActiveState)" = active ] && break
    sleep 0.5
done
journal_since "$mark" -u permitgate.service >"$logs/journal-sigkill.txt"
stop_post="$(grep -E 'front: locked|gate: unlocked' "$logs/journal-sigkill.txt" | sed 's/^.*\]: //' | tr '\n' ';')"
if [ -n "$seen" ] && grep -q "status=9/KILL" "$logs/journal-sigkill.txt" && [ -n "$stop_post" ]; then
    pass exec-stop-post "before: $before; SIGKILL to pid $old_pid; front=false gate=true $seen; ExecStopPost printed '$stop_post'; restarted as pid $(prop MainPID) (NRestarts $restarts -> $(prop NRestarts))"
else
    fail exec-stop-post "before: $before; now front=$(relay front) gate=$(relay gate); journal: $(tr '\n' '|' <"$logs/journal-sigkill.txt" | tail -c 1500)"
fi

# -- the watchdog ------------------------------------------------------------------------
sleep 3
restarts="$(prop NRestarts)"
old_pid="$(prop MainPID)"
mark="$(cursor)"
ct /bin/sh -c "kill -STOP $old_pid"
started=$SECONDS
restarted=""
while [ $((SECONDS - started)) -lt 150 ]; do
    if [ "$(prop NRestarts)" -gt "$restarts" ] && [ "$(prop ActiveState)" = active ] \
            && [ "$(prop MainPID)" != "$old_pid" ] && [ "$(prop MainPID)" != 0 ]; then
        restarted=$((SECONDS - started))
        break
    fi
    sleep 1
done
journal_since "$mark" -u permitgate.service >"$logs/journal-watchdog.txt"
timeout_line="$(grep -m1 -i 'watchdog timeout' "$logs/journal-watchdog.txt" | sed 's/^.*\]: //')"
exit_line="$(grep -m1 'Main process exited' "$logs/journal-watchdog.txt" | sed 's/^.*\]: //')"
if [ -n "$restarted" ] && [ -n "$timeout_line" ]; then
    pass watchdog "SIGSTOP to pid $old_pid; '$timeout_line'; '$exit_line'; active again as pid $(prop MainPID) after ${restarted} s (NRestarts $restarts -> $(prop NRestarts))"
else
    fail watchdog "no watchdog restart within 150 s: $(tr '\n' '|' <"$logs/journal-watchdog.txt" | tail -c 1500)"
    ct /bin/sh -c "kill -CONT $old_pid" 2>/dev/null || true
fi

# -- the exposure score, from the installed unit -----------------------------------------
exposure_of() { sed -n 's/.*Overall exposure level for permitgate\.service: *\([0-9.]*\).*/\1/p'; }
ct systemd-analyze security --no-pager permitgate.service >"$logs/security-online.txt" 2>&1 || true
ct systemd-analyze security --offline=true --no-pager /etc/systemd/system/permitgate.service \
    >"$logs/security-offline.txt" 2>&1 || true
online="$(exposure_of <"$logs/security-online.txt")"
offline="$(exposure_of <"$logs/security-offline.txt")"
if [ -n "$online" ] && python3 -c "import sys; sys.exit(0 if float('$online') <= $max_exposure else 1)"; then
    pass exposure "systemd-analyze security permitgate.service (running unit): $online; --offline=true on the installed file: ${offline:-?} (limit $max_exposure)"
else
    fail exposure "online '${online:-none}', offline '${offline:-none}' (limit $max_exposure); see $logs/security-online.txt"
fi
if ct systemd-analyze verify /etc/systemd/system/permitgate.service >"$logs/verify.txt" 2>&1; then
    say "  systemd-analyze verify: no complaint"
else
    say "  systemd-analyze verify: $(tr '\n' ';' <"$logs/verify.txt")"
fi

# -- upgrade and rollback with the service running ---------------------------------------
ct systemctl kill --kill-whom=all --signal=SIGCONT permitgate.service 2>/dev/null || true
# shellcheck source=scripts/systemd-upgrade.sh
. "$here/scripts/systemd-upgrade.sh"

# -- stop --------------------------------------------------------------------------------
ct systemctl kill --kill-whom=all --signal=SIGCONT permitgate.service 2>/dev/null || true
mark="$(cursor)"
started=$SECONDS
ct timeout 60 systemctl stop permitgate.service || true
took=$((SECONDS - started))
journal_since "$mark" -u permitgate.service >"$logs/journal-stop.txt"
if [ "$(prop ActiveState)" = inactive ] && [ "$took" -lt 15 ] && [ "$(relay front)" = false ] \
        && [ "$(relay gate)" = true ]; then
    pass stop "systemctl stop took ${took} s (TimeoutStopSec=15); $(prop ActiveState), Result=$(prop Result); front=false gate=true"
else
    fail stop "took ${took} s; $(prop ActiveState) $(prop Result); front=$(relay front) gate=$(relay gate)"
fi
ct journalctl -q --no-pager -o short-monotonic -u permitgate.service >"$logs/journal-permitgate.txt"
ct journalctl -q --no-pager -o short-monotonic -p warning >"$logs/journal-warnings.txt" || true
say "logs: $logs"
summary systemd-check

#!/usr/bin/env bash
# Installs or upgrades permitgate as a systemd service on Debian / Raspberry Pi OS (as root).
#
#   sudo provisioning/install.sh --config my-building.toml --site-key office-issued.key
#   sudo systemctl enable --now permitgate
#
# Every run installs this checkout as a new release, /opt/permitgate-releases/VERSION-TIME,
# with a virtual environment of its own, and points the link /opt/permitgate (the path the
# units name) at it, so files gone from the checkout are gone from /opt/permitgate. It
# creates the `permitgate` system user, puts the configuration in /etc/permitgate and the
# site key in /etc/permitgate/credentials (root only; systemd hands it to the agent as a
# credential), validates the configuration with the new release, and installs the
# hardened unit. Configuration, keys and data are kept.
#
# Run again to upgrade. With the service stopped, the new release's start checks run:
# `permitgate migrate` as the service user (the store's migrations, after a copy of the
# store into /var/backups/permitgate/RELEASE), then, if the service was running or is
# enabled, its start, after which it must stay up, as the same process, for 10 seconds
# ($PERMITGATE_SETTLE_S); then --check. If one fails, the previous release is put back,
# with the store copy (when a migration was due) and the replaced configuration, and
# started again. The current release and the one before it are kept (docs/operations.md,
# "Upgrading").
#
# With --web [--web-cert web.crt --web-key web.key] also the landlord page: its own
# `permitgate-web` user (a member of the `permitgate` group, to reach
# /run/permitgate/web.sock), its unit, and its certificate as systemd credentials; set
# [enrollment] web_socket = "/run/permitgate/web.sock" and web_group = "permitgate". An
# installed page is kept up to date by later runs without --web.
#
#   --extras LIST the package's extras to install (osdp, gpio, pcsc; web is --web),
#                 besides those the current release's environment has: an upgrade keeps them
#   --check CMD   a further start check: `sh -c CMD` after the start, as root, with
#                 $PERMITGATE_RELEASE set to the new release's folder; failing rolls back
#   --root DIR    install under DIR instead of / (tests): no users, no systemd, checks run
#                 as the caller; the environment's paths name DIR, so it is no image
# $PERMITGATE_BOOTSTRAP, for tests: a command run as `CMD RELEASE EXTRAS` that builds
# RELEASE/.venv instead of scripts/bootstrap.sh and pip (which install from PyPI).
# $PERMITGATE_SETTLE_S: how long the started service must stay up (10 seconds).
set -euo pipefail
shopt -s nullglob
# What is installed for the service must be readable by its user whatever the caller's
# umask (077 left /opt/permitgate at 0700: the unit failed with 203/EXEC); secrets get
# explicit modes below.
umask 022
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
config="" site_key="" web="" web_cert="" web_key="" check="" root="" extras=""
die() { echo "install.sh: $1" >&2; exit "${2:-2}"; }
add_extra() {  # add_extra NAME: once in $extras (comma-separated)
    case "$1" in osdp|gpio|pcsc|web) ;; *) die "--extras: unknown extra '$1' (osdp, gpio, pcsc, web)" ;; esac
    case ",$extras," in *",$1,"*) ;; *) extras="${extras:+$extras,}$1" ;; esac
}
while [ $# -gt 0 ]; do
    case "$1" in
        --config) config="$2"; shift 2 ;;
        --site-key) site_key="$2"; shift 2 ;;
        --web) web=1; shift ;;
        --web-cert) web_cert="$2"; web=1; shift 2 ;;
        --web-key) web_key="$2"; web=1; shift 2 ;;
        --extras) for e in ${2//,/ }; do add_extra "$e"; [ "$e" != web ] || web=1; done; shift 2 ;;
        --check) check="$2"; shift 2 ;;
        --root) mkdir -p "$2"; root="$(cd "$2" && pwd -P)"; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[ -n "$root" ] || [ "$(id -u)" = 0 ] || die "run as root (sudo)"
[ -z "$config" ] || [ -f "$config" ] || die "--config $config: no such file"
[ -z "$site_key" ] || [ -f "$site_key" ] || die "--site-key $site_key: no such file"
for f in "$web_cert" "$web_key"; do
    [ -z "$f" ] || [ -f "$f" ] || die "$f: no such file"
done
settle="${PERMITGATE_SETTLE_S:-10}"
case "$settle" in ''|*[!0-9]*) die "PERMITGATE_SETTLE_S=$settle: not a number of seconds" ;; esac

prefix="$root/opt/permitgate"              # a link to the current release
releases="$root/opt/permitgate-releases"
etc="$root/etc/permitgate"
units="$root/etc/systemd/system"
backups="$root/var/backups/permitgate"
systemd=""
[ -z "$root" ] && [ -d /run/systemd/system ] && systemd=1
[ -f "$units/permitgate-web.service" ] && web=1
[ -z "$web" ] || add_extra web
# The hardware extras the current release's environment has (installed with the release,
# or by hand later) go into the new one too: without them its drivers would not load.
if [ -x "$prefix/.venv/bin/python" ]; then
    for pair in osdp:libosdp gpio:gpiod pcsc:pyscard; do
        if "$prefix/.venv/bin/python" -c 'import importlib.metadata as m, sys; m.distribution(sys.argv[1])' \
                "${pair#*:}" >/dev/null 2>&1; then
            add_extra "${pair%%:*}"
        fi
    done
fi

version_of() { sed -n 's/^version = "\(.*\)"$/\1/p' "$1/pyproject.toml" | head -1; }
version="$(version_of "$src")"
[ -n "$version" ] || die "$src/pyproject.toml names no version"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
id="$version-$stamp"
n=1
while [ -e "$releases/$id" ]; do n=$((n + 1)); id="$version-$stamp-$n"; done
release="$releases/$id"
switched=""
cleanup() {
    # A release that never became current (its build or configuration check failed).
    [ -n "$switched" ] || rm -rf "$release"
    rm -f "$prefix.new"
}
trap cleanup EXIT

# -- the new release, beside the running one ----------------------------------------------
mkdir -p "$releases"
chmod 0755 "$releases"
mkdir "$release"
tar -C "$src" --exclude=.venv --exclude=.git --exclude=permitgate-data --exclude=__pycache__ \
    --exclude=.mypy_cache --exclude=.pytest_cache --exclude=.ruff_cache --exclude=.hypothesis \
    --exclude='*.egg-info' -cf - . | tar -C "$release" -xf -
if [ -n "${PERMITGATE_BOOTSTRAP:-}" ]; then
    "$PERMITGATE_BOOTSTRAP" "$release" "$extras"
else
    "$release/scripts/bootstrap.sh" runtime
    if [ -n "$extras" ]; then
        "$release/.venv/bin/python" -m pip install -q -e "$release[$extras]" >&2
    fi
fi
# A checkout made under a strict umask has private files; the service user reads them.
chmod -R u+rwX,go+rX,go-w "$release"

if [ -z "$root" ]; then
    getent passwd permitgate >/dev/null || adduser --system --group --no-create-home --home /var/lib/permitgate permitgate
    for group in dialout gpio; do
        getent group "$group" >/dev/null && usermod -a -G "$group" permitgate
    done
fi

install -d -m 0755 "$etc"
install -d -m 0700 "$etc/credentials"
replaced=""
if [ -n "$config" ]; then
    if [ -f "$etc/permitgate.toml" ] && ! cmp -s "$config" "$etc/permitgate.toml"; then
        cp -p "$etc/permitgate.toml" "$etc/permitgate.toml.previous"
        replaced=1
    fi
    install -m 0644 "$config" "$etc/permitgate.toml"
elif [ ! -f "$etc/permitgate.toml" ]; then
    install -m 0644 "$release/config/permitgate.example.toml" "$etc/permitgate.toml"
    echo "install.sh: wrote the example configuration to $etc/permitgate.toml: edit it" >&2
fi
restore_config() {
    if [ -n "$replaced" ]; then
        cp -p "$etc/permitgate.toml.previous" "$etc/permitgate.toml"
        echo "install.sh: the configuration is back as it was ($etc/permitgate.toml)" >&2
    fi
}
if [ -n "$site_key" ]; then
    install -m 0600 "$site_key" "$etc/credentials/site.key"
fi
[ -f "$etc/credentials/site.key" ] || echo "install.sh: no site key yet: copy the office's key to $etc/credentials/site.key" >&2

if ! "$release/.venv/bin/permitgate" check-config --config "$etc/permitgate.toml"; then
    restore_config
    die "the new release refuses the configuration: nothing was changed"
fi
if [ -n "$web" ] && [ -z "$root" ]; then
    getent passwd permitgate-web >/dev/null || adduser --system --group --no-create-home --home /var/lib/permitgate-web permitgate-web
    usermod -a -G permitgate permitgate-web
    [ -z "$web_cert" ] || install -m 0600 "$web_cert" "$etc/credentials/web.crt"
    [ -z "$web_key" ] || install -m 0600 "$web_key" "$etc/credentials/web.key"
    [ -f "$etc/credentials/web.key" ] || echo "install.sh: no page certificate yet: 'python -m provisioning.pki client PKI <gateway name>' makes one; install it with --web-cert/--web-key" >&2
fi

# -- the switch -----------------------------------------------------------------------------
install_units() {  # install_units RELEASE_FOLDER
    install -d "$units"
    install -m 0644 "$1/systemd/permitgate.service" "$units/permitgate.service"
    if [ -n "$web" ] && [ -f "$1/systemd/permitgate-web.service" ]; then
        install -m 0644 "$1/systemd/permitgate-web.service" "$units/permitgate-web.service"
    fi
    [ -z "$systemd" ] || systemctl daemon-reload
}
switch_to() {  # switch_to RELEASE: point the link at it (replaced in one rename)
    ln -sfn "permitgate-releases/$1" "$prefix.new"
    mv -T "$prefix.new" "$prefix"
}
as_agent() {  # the service user runs the command (the caller under --root)
    if [ -n "$root" ]; then (cd / && "$@"); else (cd / && runuser -u permitgate -- "$@"); fi
}
want_running="" web_running=""
if [ -n "$systemd" ]; then
    if systemctl is-active --quiet permitgate.service || systemctl is-enabled --quiet permitgate.service 2>/dev/null; then
        want_running=1
    fi
    systemctl is-active --quiet permitgate-web.service && web_running=1
    # The store is free for the migration only with the agent stopped.
    systemctl stop permitgate.service 2>/dev/null || true
fi
if [ -d "$prefix" ] && [ ! -L "$prefix" ]; then
    # A copy installed before releases: it becomes the previous release as it is.
    flat="$(version_of "$prefix")"
    flat="${flat:-unknown}-before-releases"
    mv -T "$prefix" "$releases/$flat"
    switch_to "$flat"
fi
previous=""
[ ! -L "$prefix" ] || previous="$(basename "$(readlink "$prefix")")"
[ -z "$previous" ] || [ -d "$releases/$previous" ] || previous=""
backup="$backups/$id"
install -d -m 0755 "$backups"
if [ -n "$root" ]; then
    install -d -m 0700 "$backup"
else
    install -d -m 0700 -o permitgate -g permitgate "$backup"
fi
switch_to "$id"
switched=1
install_units "$release"

restore_store() {  # the store copy, if a migration was due (an older release refuses it)
    [ -f "$backup/migrated" ] && [ -f "$backup/restore" ] || return 0
    while IFS= read -r live; do
        [ -n "$live" ] || continue
        # A new file in the old one's place (a process still holding the old one keeps
        # it), with no WAL of the migrated store left beside it.
        cp -p "$backup/$(basename "$live")" "$live.restored"
        rm -f "$live-wal" "$live-shm"
        mv -f "$live.restored" "$live"
    done <"$backup/restore"
    echo "install.sh: the store is back as it was before the migration" >&2
}
rollback() {  # rollback REASON
    echo "install.sh: $id failed its start checks: $1" >&2
    if [ -z "$previous" ]; then
        die "no previous release to go back to: $id stays installed; fix the problem and run install.sh again" 1
    fi
    [ -z "$systemd" ] || systemctl stop permitgate.service 2>/dev/null || true
    switch_to "$previous"
    restore_store
    restore_config
    install_units "$releases/$previous"
    if [ -n "$want_running" ]; then
        systemctl start permitgate.service || echo "install.sh: $previous did not start either: see 'systemctl status permitgate'" >&2
    fi
    [ -z "$web_running" ] || systemctl try-restart permitgate-web.service || true
    rm -rf "$release" "$backup"
    die "rolled back: $previous is the current release again" 1
}

# -- the start checks ---------------------------------------------------------------------------
if ! as_agent "$release/.venv/bin/permitgate" migrate --config "$etc/permitgate.toml" --backup "$backup"; then
    rollback "permitgate migrate failed"
fi
if [ -n "$want_running" ] && ! { systemctl start permitgate.service && systemctl is-active --quiet permitgate.service; }; then
    rollback "permitgate.service did not start (see 'journalctl -u permitgate')"
fi
# `systemctl start` returns at the agent's READY=1: an agent that dies a few seconds later
# passed the check above, and Restart=always would then restart it for ever on the new
# release. It must stay active as the same process, not restarted, for a while.
stays_up() {
    local pid restarts
    pid="$(systemctl show -P MainPID permitgate.service)"
    restarts="$(systemctl show -P NRestarts permitgate.service)"
    for _ in $(seq "$settle"); do
        sleep 1
        systemctl is-active --quiet permitgate.service || return 1
        [ "$(systemctl show -P MainPID permitgate.service)" = "$pid" ] || return 1
    done
    [ "$(systemctl show -P NRestarts permitgate.service)" = "$restarts" ]
}
if [ -n "$want_running" ] && ! stays_up; then
    rollback "permitgate.service did not stay up for $settle s (see 'journalctl -u permitgate')"
fi
if [ -n "$check" ] && ! PERMITGATE_RELEASE="$release" sh -c "$check"; then
    rollback "--check '$check' failed"
fi
[ -z "$web_running" ] || systemctl try-restart permitgate-web.service || echo "install.sh: permitgate-web did not restart: see 'systemctl status permitgate-web'" >&2

# -- keep two releases ------------------------------------------------------------------------
for folder in "$releases"/*; do
    name="$(basename "$folder")"
    [ "$name" = "$id" ] || [ "$name" = "$previous" ] || rm -rf "$folder"
done
for folder in "$backups"/*; do
    [ "$folder" = "$backup" ] || rm -rf "$folder"
done
[ -f "$backup/migrated" ] || rm -rf "$backup"

if [ -z "$previous" ]; then
    echo "installed $id: start it with 'systemctl enable --now permitgate'"
elif [ -n "$want_running" ]; then
    echo "upgraded to $id (from $previous, kept for rollback): permitgate is running"
else
    echo "upgraded to $id (from $previous, kept for rollback): start it with 'systemctl enable --now permitgate'"
fi

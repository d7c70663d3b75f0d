# Shared helpers of scripts/systemd-check.sh and scripts/arm64-check.sh (sourced, not run).
#
# Everything these checks build (Debian roots, logs) lives under $PERMITGATE_CHECK_DIR,
# /var/tmp/permitgate-check by default, never in the repository. A pristine debootstrap
# root per architecture is kept there (base-ARCH, marked by .permitgate-base-ok) and copied
# for each run, so a second run skips the download.
# shellcheck shell=bash

# Files made here and commands run in the roots get the usual root umask, whatever the
# caller's (pytest's conftest sets 077); a check that wants another sets it itself.
umask 022
check_dir="${PERMITGATE_CHECK_DIR:-/var/tmp/permitgate-check}"
suite=bookworm
mirror="${PERMITGATE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
passed=0
failed=0
failures=""

say() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { say "ERROR: $*" >&2; exit 2; }
pass() { passed=$((passed + 1)); say "PASS $1: $2"; }
fail() { failed=$((failed + 1)); failures="$failures $1"; say "FAIL $1: $2"; }

# need_root: the checks debootstrap, chroot, mount and boot containers.
need_root() {
    [ "$(id -u)" = 0 ] || die "run as root: debootstrap, chroot and systemd-nspawn need it"
}

# host_packages PKG...: install the Debian packages that are missing on the host.
host_packages() {
    local missing="" pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing="$missing $pkg"
    done
    [ -z "$missing" ] && return 0
    command -v apt-get >/dev/null || die "missing host packages:$missing (and no apt-get)"
    say "installing host packages:$missing"
    # shellcheck disable=SC2086 # the package list is split on purpose
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing \
        >/dev/null; } || die "could not install host packages:$missing"
}

# clean_env CMD...: run CMD with a minimal environment (no host pip/proxy variables).
clean_env() {
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 TERM=dumb DEBIAN_FRONTEND=noninteractive "$@"
}

# base_root ARCH INCLUDE: a pristine debootstrapped Debian 12 root for ARCH, made once.
# Prints its path.
base_root() {
    local arch="$1" include="$2" base="$check_dir/base-$1"
    if [ -f "$base/.permitgate-base-ok" ] && [ "$(cat "$base/.permitgate-base-ok")" = "$include" ]; then
        say "reusing $base (debootstrap done $(stat -c %y "$base/.permitgate-base-ok" | cut -d. -f1))" >&2
    else
        rm -rf "$base"
        mkdir -p "$check_dir"
        say "debootstrap --arch=$arch --variant=minbase $suite $base (a few minutes)" >&2
        local started=$SECONDS
        debootstrap --arch="$arch" --variant=minbase --include="$include" "$suite" "$base" \
            "$mirror" >"$check_dir/debootstrap-$arch.log" 2>&1 \
            || { tail -20 "$check_dir/debootstrap-$arch.log" >&2; die "debootstrap $arch failed (log: $check_dir/debootstrap-$arch.log)"; }
        printf '%s' "$include" >"$base/.permitgate-base-ok"
        say "debootstrap $arch took $((SECONDS - started)) s" >&2
    fi
    printf '%s\n' "$base"
}

# unmount_under DIR: unmount everything mounted at or below DIR (deepest first), and fail
# if anything stays mounted: a root is never removed while host folders are mounted in it.
unmount_under() {
    local dir mnt
    dir="$(readlink -f "$1")"
    awk -v d="$dir" '$2 == d || index($2, d "/") == 1 {print $2}' /proc/self/mounts | sort -r \
        | while read -r mnt; do umount "$mnt" 2>/dev/null || umount -l "$mnt"; done
    ! awk -v d="$dir" '$2 == d || index($2, d "/") == 1 {found=1} END {exit !found}' /proc/self/mounts \
        || die "still mounted under $dir: not removing it"
}

# fresh_copy BASE DEST: DEST becomes a copy of BASE (the previous run's copy removed).
fresh_copy() {
    [ -e "$2" ] && unmount_under "$2"
    rm -rf "$2"
    cp -a "$1" "$2"
}

# registry_access ROOT: pip and apt inside ROOT reach the registries as the host does.
# pip needs the host's CA bundle (TLS is re-signed on this kind of machine) and the
# machine's pip configuration, reduced to the certificate (the host's local wheel folders
# do not exist inside the root).
registry_access() {
    local root="$1"
    install -d "$root/etc/ssl/certs"
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
    cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
    # The same Debian archive the host uses, security updates included.
    printf 'deb %s %s main\ndeb %s %s-updates main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
        "$mirror" "$suite" "$mirror" "$suite" "$suite" >"$root/etc/apt/sources.list"
}

# copy_checkout SRC DEST: the checkout's files (not .venv, .git, caches) to DEST: the work
# tree as it is, or with $from_head set the last commit (git archive HEAD), which other
# people's unfinished edits in the work tree cannot change.
copy_checkout() {
    local src="$1" dest="$2"
    mkdir -p "$dest"
    if [ -n "${from_head:-}" ]; then
        git -C "$src" archive --format=tar HEAD | tar -C "$dest" -xf -
        return
    fi
    tar -C "$src" --exclude=.venv --exclude=.git --exclude=permitgate-data \
        --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.pytest_cache \
        --exclude=.hypothesis --exclude='*.egg-info' --exclude=__pycache__ -cf - . \
        | tar -C "$dest" -xf -
}

# checkout_id DIR: the commit, and whether the work tree (when that is what is checked)
# differs from it.
checkout_id() {
    local rev dirty
    rev="$(git -C "$1" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    if [ -n "${from_head:-}" ]; then
        printf 'commit %s (git archive HEAD)\n' "$rev"
        return
    fi
    dirty="$(git -C "$1" status --porcelain 2>/dev/null | wc -l)"
    printf 'the work tree at commit %s (%s files differ from it)\n' "$rev" "$dirty"
}

# summary NAME: the closing line; exit status 0 only when nothing failed.
summary() {
    say "$1: $passed passed, $failed failed${failures:+ (failed:$failures)}"
    [ "$failed" = 0 ]
}

#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv.
# Usage: scripts/bootstrap.sh [runtime|dev]
# Needs Python >= 3.11 with venv (Debian/Raspberry Pi OS: python3-venv); as root it installs
# that package itself when it is missing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
flavour="${1:-runtime}"
venv="$here/.venv"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
    echo "permitgate needs Python 3.11 or newer ('$python' is $("$python" --version 2>&1))" >&2
    exit 2
fi
if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -m venv "$venv" 2>/dev/null; then
        rm -rf "$venv"
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
            "$python" -m venv "$venv"
        else
            echo "cannot create a virtual environment: install python3-venv" \
                 "(sudo apt-get install python3-venv) and run this again" >&2
            exit 2
        fi
    fi
fi
# The test suite talks to real peers: Mosquitto (tests/broker.py), pcscd with the vpcd
# virtual reader (PC/SC tests), libnfc's nfc-list (PN532 cross-check); pyscard builds from
# source here (swig, libpcsclite-dev). Only the programs are wanted: a policy-rc.d that
# answers 101 keeps the packages from starting their system services. The landlord page's
# browser tests drive Debian's chromium through Playwright (no browser download), and
# Chinese text in their screenshots needs a CJK font. zbarimg reads back the QR codes
# `permitgate provision` prints.
dev_packages="mosquitto mosquitto-clients pcscd vsmartcard-vpcd libpcsclite-dev swig libnfc-bin faketime"
dev_packages="$dev_packages chromium fonts-wqy-microhei zbar-tools"
if [ "$flavour" = dev ]; then
    missing=""
    for pkg in $dev_packages; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing="$missing $pkg"
    done
    if [ -n "$missing" ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            policy=/usr/sbin/policy-rc.d
            own_policy=
            if [ ! -e "$policy" ]; then
                printf '#!/bin/sh\nexit 101\n' >"$policy"
                chmod 755 "$policy"
                own_policy=1
            fi
            status=0
            # shellcheck disable=SC2086 # word splitting of the package list is wanted
            { apt-get update -qq &&
              DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null; } \
                || status=$?
            if [ -n "$own_policy" ]; then rm -f "$policy"; fi
            [ "$status" = 0 ] || { echo "could not install:$missing" >&2; exit "$status"; }
        else
            echo "the tests need these Debian packages:$missing" \
                 "(sudo apt-get install$missing)" >&2
            exit 2
        fi
    fi
fi

stamp="$venv/.installed-$flavour"
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    if [ "$flavour" = dev ]; then
        "$venv/bin/python" -m pip install -q -e "$here[dev]" >&2
    else
        "$venv/bin/python" -m pip install -q -e "$here" >&2
    fi
    touch "$stamp"
fi

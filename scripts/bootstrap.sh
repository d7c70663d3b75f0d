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

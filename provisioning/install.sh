#!/usr/bin/env bash
# Installs permitgate as a systemd service on Debian / Raspberry Pi OS (run as root).
#
#   sudo provisioning/install.sh --config my-building.toml --site-key office-issued.key
#   sudo systemctl enable --now permitgate
#
# Copies this checkout to /opt/permitgate, builds its virtual environment, creates the
# `permitgate` system user, puts the configuration in /etc/permitgate and the site key in
# /etc/permitgate/credentials (root only; systemd hands it to the agent as a credential),
# validates the configuration, and installs the hardened unit. Safe to run again to upgrade.
# With --web [--web-cert web.crt --web-key web.key] also the landlord page: its own
# `permitgate-web` user (a member of the `permitgate` group, to reach
# /run/permitgate/web.sock), its unit, and its certificate as systemd credentials; set
# [enrollment] web_socket = "/run/permitgate/web.sock" and web_group = "permitgate".
set -euo pipefail
# What is installed for the service must be readable by its user whatever the caller's
# umask (077 left /opt/permitgate at 0700: the unit failed with 203/EXEC); secrets get
# explicit modes below.
umask 022
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix=/opt/permitgate
etc=/etc/permitgate
config="" site_key="" web="" web_cert="" web_key=""
while [ $# -gt 0 ]; do
    case "$1" in
        --config) config="$2"; shift 2 ;;
        --site-key) site_key="$2"; shift 2 ;;
        --web) web=1; shift ;;
        --web-cert) web_cert="$2"; web=1; shift 2 ;;
        --web-key) web_key="$2"; web=1; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (sudo)" >&2; exit 2; }
[ -z "$config" ] || [ -f "$config" ] || { echo "install.sh: --config $config: no such file" >&2; exit 2; }
[ -z "$site_key" ] || [ -f "$site_key" ] || { echo "install.sh: --site-key $site_key: no such file" >&2; exit 2; }
for f in "$web_cert" "$web_key"; do
    [ -z "$f" ] || [ -f "$f" ] || { echo "install.sh: $f: no such file" >&2; exit 2; }
done

if [ "$src" != "$prefix" ]; then
    mkdir -p "$prefix"
    tar -C "$src" --exclude=.venv --exclude=.git --exclude=permitgate-data -cf - . | tar -C "$prefix" -xf -
fi
"$prefix/scripts/bootstrap.sh" runtime
if [ -n "$web" ]; then
    "$prefix/.venv/bin/python" -m pip install -q -e "$prefix[web]" >&2
fi
# A checkout made under a strict umask has private files; the service user reads them.
chmod -R u+rwX,go+rX,go-w "$prefix"

getent passwd permitgate >/dev/null || adduser --system --group --no-create-home --home /var/lib/permitgate permitgate
for group in dialout gpio; do
    getent group "$group" >/dev/null && usermod -a -G "$group" permitgate
done

install -d -m 0755 "$etc"
install -d -m 0700 "$etc/credentials"
if [ -n "$config" ]; then
    install -m 0644 "$config" "$etc/permitgate.toml"
elif [ ! -f "$etc/permitgate.toml" ]; then
    install -m 0644 "$prefix/config/permitgate.example.toml" "$etc/permitgate.toml"
    echo "install.sh: wrote the example configuration to $etc/permitgate.toml: edit it" >&2
fi
if [ -n "$site_key" ]; then
    install -m 0600 "$site_key" "$etc/credentials/site.key"
fi
[ -f "$etc/credentials/site.key" ] || echo "install.sh: no site key yet: copy the office's key to $etc/credentials/site.key" >&2

"$prefix/.venv/bin/permitgate" check-config --config "$etc/permitgate.toml"
install -m 0644 "$prefix/systemd/permitgate.service" /etc/systemd/system/permitgate.service
if [ -n "$web" ]; then
    getent passwd permitgate-web >/dev/null || adduser --system --group --no-create-home --home /var/lib/permitgate-web permitgate-web
    usermod -a -G permitgate permitgate-web
    [ -z "$web_cert" ] || install -m 0600 "$web_cert" "$etc/credentials/web.crt"
    [ -z "$web_key" ] || install -m 0600 "$web_key" "$etc/credentials/web.key"
    [ -f "$etc/credentials/web.key" ] || echo "install.sh: no page certificate yet: 'python -m provisioning.pki client PKI <gateway name>' makes one; install it with --web-cert/--web-key" >&2
    install -m 0644 "$prefix/systemd/permitgate-web.service" /etc/systemd/system/permitgate-web.service
    echo "landlord page: create the first account with 'sudo -u permitgate-web $prefix/.venv/bin/permitgate-web users init --config $etc/permitgate.toml', then 'systemctl enable --now permitgate-web'"
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
echo "installed: start it with 'systemctl enable --now permitgate'"

# The upgrade path of provisioning/install.sh under a real systemd: sourced by
# scripts/systemd-check.sh (not run on its own) while permitgate.service runs in the
# container. It uses that script's helpers (ct, prop, cursor, journal_since, pass, fail,
# say) and variables ($root, $logs, $card). Checks, one PASS/FAIL line each:
#
#   upgrade    a second release (the installed checkout with its version bumped and one
#              more store migration, made in a copy inside the container) installed over
#              the running one by its own `install.sh` without arguments: exit 0, the unit
#              active/running again with a new main PID, /opt/permitgate pointing at the
#              new release, `permitgate status` reporting the new version for the program
#              and the running agent and the store one schema version on, the store copy
#              kept in /var/backups/permitgate, the events recorded before (a tap just
#              before the upgrade) still there and the chain verified, the configuration
#              and key unchanged, the card still granted, the extras (libosdp, gpiod,
#              pyscard) in the new environment; the release before kept, still running
#              its own code
#   rollback   a third release with a further migration whose agent exits 1 at
#              `permitgate run` (its migrate, check-config and safe-state work): its
#              install.sh exits 1 saying it rolled back, the store copy is put back (the
#              second release refuses the migrated store), the unit is active/running on
#              the second release again, the link points back, the third release's folder
#              is gone, two releases remain, the events, configuration and card are as
#              before
#   rollback-late  the same with a fourth release whose agent starts (READY=1) and exits
#              1 three seconds later: `systemctl start` succeeds, but install.sh must see
#              it go down within its settle time ($PERMITGATE_SETTLE_S, 10 s) and roll
#              back
#
# and one fact, printed (not counted): what systemd does with a unit whose LoadCredential=
# names a file that does not exist (load-credential-missing).
# shellcheck shell=bash disable=SC2154 # $root, $logs, $card: set by systemd-check.sh

src_dir=/root/permitgate-src
conf=/etc/permitgate/permitgate.toml

# pg ARGS...: the installed permitgate as the service user (docs/operations.md).
pg() { ct runuser -u permitgate -- /opt/permitgate/.venv/bin/permitgate "$@" -c "$conf"; }
# status_fields: "VERSION AGENT_VERSION AGENT_STATE EVENTS SCHEMA" from `permitgate status
# --json`.
status_fields() {
    pg status --json 2>"$logs/status-stderr.txt" | python3 -c 'import json, sys
r = json.load(sys.stdin)
print(r["version"], r["agent"].get("version"), r["agent"].get("state").replace(" ", "_"),
      r["events"], r["schema_version"])' 2>/dev/null || echo "? ? unreadable ? ?"
}
current_release() { ct readlink /opt/permitgate | sed 's|^permitgate-releases/||'; }
releases_now() { ct ls /opt/permitgate-releases | tr '\n' ' ' | sed 's/ $//'; }
sha_of() { ct sha256sum "$1" | cut -c1-16; }
# wait_active: until the unit is active/running with a main PID (30 s at most).
wait_active() {
    for _ in $(seq 60); do
        [ "$(prop ActiveState)/$(prop SubState)" = active/running ] && [ "$(prop MainPID)" != 0 ] && return 0
        sleep 0.5
    done
    return 1
}
# own_code RELEASE: the version and real folder of the agent package that RELEASE's own
# environment imports (a rollback to RELEASE runs this code).
own_code() {
    ct "/opt/permitgate-releases/$1/.venv/bin/python" -c \
        'import os, agent; print(agent.__version__, os.path.dirname(os.path.realpath(agent.__file__)))' \
        2>&1 | tail -1
}
# make_release NAME VERSION MIGRATIONS [fail|late]: /root/NAME in the container, a copy of
# the installed checkout with VERSION in pyproject.toml and agent/__init__.py and
# MIGRATIONS (a number) more event store migrations, each creating a table
# upgrade_probe_N; with "fail", its `permitgate run` exits 1 before it is ready, with
# "late" three seconds after (every other command works).
make_release() {
    local dir="$root/root/$1"
    rm -rf "$dir"
    cp -a "$root$src_dir" "$dir"
    python3 - "$dir" "$2" "$3" "${4:-}" <<'EOF' || die "could not make the release source $dir"
import re, sys
from pathlib import Path
folder, version, migrations, fail = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
for name, pattern, line in (("pyproject.toml", r'^version = ".*"$', f'version = "{version}"'),
                            ("agent/__init__.py", r'^__version__ = ".*"$',
                             f'__version__ = "{version}"')):
    path = folder / name
    text, count = re.subn(pattern, line, path.read_text("utf-8"), count=1, flags=re.M)
    if count != 1:
        sys.exit(f"{name} names no version")
    path.write_text(text, "utf-8")
if migrations:
    # As tests/test_upgrade.py adds one: appended to the event store's migrations.
    store = folder / "agent/store.py"
    anchor = "SCHEMA_VERSION = len(EVENT_MIGRATIONS)"
    text = store.read_text("utf-8")
    if text.count(anchor) != 1:
        sys.exit("agent/store.py changed how it counts migrations")
    added = ", ".join(repr(f"CREATE TABLE upgrade_probe_{n} (id INTEGER PRIMARY KEY);")
                      for n in range(1, migrations + 1))
    store.write_text(text.replace(anchor, f"EVENT_MIGRATIONS = (*EVENT_MIGRATIONS, {added})\n"
                                          f"{anchor}"), "utf-8")
if fail:
    # The console script imports main once the module has run: this wrapper is what
    # `permitgate` calls. "fail": `run` exits 1 before it is ready; "late": `run` starts
    # as usual (READY=1) and the process exits 1 three seconds later.
    with open(folder / "agent/cli.py", "a", encoding="utf-8") as cli:
        cli.write(f'''

_checked_main = main


def main(argv=None, out=None):  # type: ignore[no-redef]
    """systemd-check's broken release ({fail})."""
    import os, threading, time
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["run"] and "{fail}" == "fail":
        sys.stderr.write("permitgate {version}: systemd-check's broken release: "
                         "exits 1 at start\\n")
        return 1
    if args[:1] == ["run"]:
        def crash():
            time.sleep(3)
            sys.stderr.write("permitgate {version}: systemd-check's broken release: "
                             "exits 1 three seconds after start\\n")
            os._exit(1)
        threading.Thread(target=crash, daemon=True).start()
    return _checked_main(argv, out)
''')
EOF
}
# install_from NAME LOG: that source's install.sh, no arguments (an upgrade keeps the
# configuration and key), under umask 077 as the first install; its exit status.
install_from() {
    local rc=0
    ct /bin/sh -c 'umask 077; exec "$@"' sh "/root/$1/provisioning/install.sh" >"$logs/$2" 2>&1 || rc=$?
    return "$rc"
}

# -- before: a running release with recorded events ----------------------------------------
wait_active || say "  permitgate.service is $(prop ActiveState)/$(prop SubState) before the upgrade"
v1="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root$src_dir/pyproject.toml" | head -1)"
[[ "${v1##*.}" =~ ^[0-9]+$ ]] || die "the version in pyproject.toml, '$v1', does not end in a number to bump"
v2="${v1%.*}.$((${v1##*.} + 1))"
v3="${v2%.*}.$((${v2##*.} + 1))"
v4="${v3%.*}.$((${v3##*.} + 1))"
r1="$(current_release)"
tap_before="$(ct /opt/permitgate/.venv/bin/permitgate sim tap front-in "$card" -c "$conf" 2>&1 || true)"
read -r _ _ _ events_before schema_before <<<"$(status_fields)"
conf_sha="$(sha_of "$conf")"
key_sha="$(sha_of /etc/permitgate/credentials/site.key)"
pid_before="$(prop MainPID)"
say "upgrade: running $r1 (MainPID $pid_before), tap '$tap_before', $events_before events; source copies: $v2 with one more store migration; $v3 with two, whose agent exits 1 at start; $v4 with one, whose agent exits 1 three seconds after it is ready"

# -- upgrade to a second release -------------------------------------------------------------
make_release "permitgate-src-$v2" "$v2" 1
mark="$(cursor)"
started=$SECONDS
rc=0
install_from "permitgate-src-$v2" upgrade.log || rc=$?
took=$((SECONDS - started))
journal_since "$mark" -u permitgate.service >"$logs/journal-upgrade.txt"
wait_active || true
r2="$(current_release)"
read -r s_version s_agent s_state events_after schema_after <<<"$(status_fields)"
verify="$(pg events verify 2>&1 | head -1 || true)"
tap_after="$(ct /opt/permitgate/.venv/bin/permitgate sim tap front-in "$card" -c "$conf" 2>&1 || true)"
old_code="$(own_code "$r1" || true)"
# The extras the first release's environment has (the check installed them) are in the new
# one: install.sh carries them over.
extras="$(ct /opt/permitgate/.venv/bin/python -c 'import importlib.metadata as m
print(" ".join(f"{d}-{m.version(d)}" for d in ("libosdp", "gpiod", "pyscard")))' 2>&1 | tail -1 || true)"
backups="$(ct find /var/backups/permitgate -type f -printf '%P ' 2>/dev/null || true)"
problems=""
[ "$rc" = 0 ] || problems="$problems install.sh exit $rc: $(tail -5 "$logs/upgrade.log" | tr '\n' '|');"
case "$r2" in "$v2"-*) ;; *) problems="$problems /opt/permitgate -> '$r2', not a $v2 release;" ;; esac
[ "$(prop ActiveState)/$(prop SubState)" = active/running ] || problems="$problems unit $(prop ActiveState)/$(prop SubState) $(prop Result);"
[ "$(prop MainPID)" != "$pid_before" ] || problems="$problems MainPID unchanged ($pid_before): not restarted;"
[ "$s_version" = "$v2" ] && [ "$s_agent" = "$v2" ] && [ "$s_state" = running ] \
    || problems="$problems status: version '$s_version', agent '$s_agent' '$s_state';"
[ "$events_after" -ge "$events_before" ] 2>/dev/null || problems="$problems events $events_before -> '$events_after';"
case "$verify" in OK:*) ;; *) problems="$problems events verify: '$verify';" ;; esac
[ "$schema_after" = "$((schema_before + 1))" ] 2>/dev/null || problems="$problems store schema $schema_before -> '$schema_after', not +1;"
case " $backups " in *" $r2/migrated "*) ;; *) problems="$problems no store copy with 'migrated' kept for $r2 (/var/backups/permitgate: ${backups:-empty});" ;; esac
[ "$(sha_of "$conf")" = "$conf_sha" ] || problems="$problems the configuration changed;"
[ "$(sha_of /etc/permitgate/credentials/site.key)" = "$key_sha" ] || problems="$problems the site key changed;"
case "$tap_after" in "OPEN"*granted*) ;; *) problems="$problems card after the upgrade: '$tap_after';" ;; esac
case "$extras" in libosdp-*" gpiod-"*" pyscard-"*) ;; *) problems="$problems extras in the new release: '$extras';" ;; esac
case "$old_code" in "$v1 /opt/permitgate-releases/$r1/agent") ;;
    *) problems="$problems the kept release $r1 imports '$old_code', not its own code (a rollback to it would run that);" ;; esac
if [ -z "$problems" ]; then
    pass upgrade "install.sh of $v2 exit 0 after ${took} s: '$(tail -1 "$logs/upgrade.log")'; $(prop ActiveState)/$(prop SubState), MainPID $pid_before -> $(prop MainPID); /opt/permitgate -> $(ct readlink /opt/permitgate); status: version $s_version, agent $s_agent $s_state, store schema $schema_before -> $schema_after; events $events_before -> $events_after, verify: '$verify'; configuration and key unchanged; card: '$tap_after'; extras carried over: $extras; releases: $(releases_now); $r1 runs its own code ($old_code); store copies kept: $backups"
else
    fail upgrade "$problems"
fi
grep -E '^(install\.sh:|store |backup |/etc/permitgate/permitgate\.toml: OK \(permitgate)' "$logs/upgrade.log" | sed 's/^/  /' || true

# rolled_back CHECK VERSION LOG REASON [restore]: install.sh of VERSION (its output in
# $logs/LOG), which must fail its start checks with REASON and put the second release back
# (with "restore": and the store copy); one PASS/FAIL line named CHECK.
rolled_back() {
    local check="$1" version="$2" log="$3" reason="$4" restore="${5:-}" rc=0 now s_version s_agent s_state
    local events_after schema_after tap_after left backups_left broken_line failed_line
    local restored="" took problems=""
    local before_events before_schema before_pid mark started=$SECONDS
    before_pid="$(prop MainPID)"
    mark="$(cursor)"
    read -r _ _ _ before_events before_schema <<<"$(status_fields)"
    install_from "permitgate-src-$version" "$log" || rc=$?
    took=$((SECONDS - started))
    wait_active || true
    journal_since "$mark" -u permitgate.service >"$logs/journal-$check.txt"
    now="$(current_release)"
    read -r s_version s_agent s_state events_after schema_after <<<"$(status_fields)"
    tap_after="$(ct /opt/permitgate/.venv/bin/permitgate sim tap front-in "$card" -c "$conf" 2>&1 || true)"
    left="$(releases_now)"
    backups_left="$(ct ls /var/backups/permitgate | tr '\n' ' ' | sed 's/ $//')"
    broken_line="$(grep -m1 "broken release" "$logs/journal-$check.txt" | sed 's/^.*\]: //' || true)"
    failed_line="$(grep -m1 -E 'Failed with result|Failed to start' "$logs/journal-$check.txt" | sed 's/^.*\]: //' || true)"
    ! grep -q "the store is back as it was before the migration" "$logs/$log" || restored=" (the copy put back)"
    [ "$rc" = 1 ] || problems="$problems install.sh exit $rc, not 1;"
    grep -q "failed its start checks: $reason" "$logs/$log" \
        || problems="$problems no '$reason' in its output;"
    grep -q "rolled back: $r2 is the current release again" "$logs/$log" \
        || problems="$problems no 'rolled back: $r2 ...' in its output: $(tail -5 "$logs/$log" | tr '\n' '|');"
    [ "$now" = "$r2" ] || problems="$problems /opt/permitgate -> '$now', not $r2;"
    [ "$(prop ActiveState)/$(prop SubState)" = active/running ] || problems="$problems unit $(prop ActiveState)/$(prop SubState) $(prop Result);"
    [ "$s_version" = "$v2" ] && [ "$s_agent" = "$v2" ] && [ "$s_state" = running ] \
        || problems="$problems status: version '$s_version', agent '$s_agent' '$s_state';"
    [ "$left" = "$r1 $r2" ] || problems="$problems releases left: '$left', not '$r1 $r2';"
    [ "$events_after" -ge "$before_events" ] 2>/dev/null || problems="$problems events $before_events -> '$events_after';"
    [ "$schema_after" = "$before_schema" ] || problems="$problems store schema $before_schema -> '$schema_after': the copy was not put back;"
    [ "$backups_left" = "$r2" ] || problems="$problems /var/backups/permitgate holds '$backups_left', not $r2;"
    [ "$(sha_of "$conf")" = "$conf_sha" ] || problems="$problems the configuration changed;"
    case "$tap_after" in "OPEN"*granted*) ;; *) problems="$problems card after the rollback: '$tap_after';" ;; esac
    [ -n "$broken_line" ] || problems="$problems the journal shows no start of the broken release;"
    [ -z "$restore" ] || [ -n "$restored" ] || problems="$problems install.sh did not put the store copy back;"
    if [ -z "$problems" ]; then
        pass "$check" "install.sh of $version exit 1 after ${took} s: '$(grep -m1 'failed its start checks' "$logs/$log")' / '$(tail -1 "$logs/$log")'; journal: '$broken_line', '$failed_line'; $(prop ActiveState)/$(prop SubState) as MainPID $(prop MainPID) (was $before_pid); /opt/permitgate -> $(ct readlink /opt/permitgate); status: version $s_version, agent $s_agent $s_state, store schema $schema_after$restored; events $before_events -> $events_after; releases: $left; store copies: $backups_left; card: '$tap_after'"
    else
        fail "$check" "$problems"
    fi
    grep -E '^install\.sh:' "$logs/$log" | sed 's/^/  /' || true
}

# -- a third release that fails before it is ready: rollback ---------------------------------
# With two migrations: the store copy must be put back (the second release refuses a store
# migrated past it).
make_release "permitgate-src-$v3" "$v3" 2 fail
rolled_back rollback "$v3" rollback.log "permitgate.service did not start" restore

# -- a fourth release that comes up, then dies: rollback -------------------------------------
# READY=1, then exit 1 three seconds later: `systemctl start` succeeds, Restart=always would
# restart it for ever; install.sh must see it go down within its settle time.
make_release "permitgate-src-$v4" "$v4" 1 late
rolled_back rollback-late "$v4" rollback-late.log "permitgate.service did not stay up"

# -- LoadCredential= of a file that does not exist (a fact, not a check) ----------------------
# A oneshot unit as the service user with a credential whose file exists (present.key, the
# site key's file); then with one more whose file does not, started twice: with the manager
# at its usual log level (what an operator sees) and at debug level (which names the file).
cred_unit() {  # cred_unit EXTRA_LINE: start the unit; "rc ActiveState Result ExecMainStatus"
    local rc=0
    cat >"$root/etc/systemd/system/pgcheck-credential.service" <<'EOF'
[Unit]
Description=LoadCredential= of a missing file (systemd-check)

[Service]
Type=oneshot
User=permitgate
ExecStart=/bin/sh -c 'echo "credentials: $(ls "$CREDENTIALS_DIRECTORY" | tr "\n" " ")"'
LoadCredential=present.key:/etc/permitgate/credentials/site.key
EOF
    printf '%s\n' "$1" >>"$root/etc/systemd/system/pgcheck-credential.service"
    ct systemctl daemon-reload
    ct systemctl reset-failed pgcheck-credential.service 2>/dev/null || true
    ct timeout 60 systemctl start pgcheck-credential.service >>"$logs/credential-missing.txt" 2>&1 || rc=$?
    echo "$rc $(ct systemctl show -P ActiveState pgcheck-credential.service)" \
        "$(ct systemctl show -P Result pgcheck-credential.service)" \
        "$(ct systemctl show -P ExecMainStatus pgcheck-credential.service)"
}
: >"$logs/credential-missing.txt"
missing_line="LoadCredential=missing.key:/etc/permitgate/credentials/does-not-exist.key"
mark="$(cursor)"
control="$(cred_unit "")"
control_out="$(journal_since "$mark" -u pgcheck-credential.service -o cat | grep -m1 '^credentials:' || true)"
mark="$(cursor)"
missing="$(cred_unit "$missing_line")"
journal_since "$mark" -u pgcheck-credential.service >>"$logs/credential-missing.txt"
seen="$(journal_since "$mark" -u pgcheck-credential.service -o cat \
    | grep -E 'credentials|CREDENTIALS' | tr '\n' '|' || true)"
ct systemd-analyze log-level debug
mark="$(cursor)"
cred_unit "$missing_line" >/dev/null
ct systemd-analyze log-level info
journal_since "$mark" -u pgcheck-credential.service >>"$logs/credential-missing.txt"
why="$(journal_since "$mark" -u pgcheck-credential.service -o cat \
    | grep -m1 'Failed to read credential' || true)"
say "  load-credential-missing: present.key only: exit/state/result/status $control, '$control_out'; with $missing_line added: $missing; journal: ${seen%|}; at debug level: $why"
ct systemctl reset-failed pgcheck-credential.service 2>/dev/null || true
rm -f "$root/etc/systemd/system/pgcheck-credential.service"
ct systemctl daemon-reload

#!/usr/bin/env bash
# Fuzzes the parsers of outside bytes for minutes, then stops by itself (docs/fuzzing.md).
#
#   scripts/fuzz.sh [TARGET|all] [SECONDS]
#
# TARGET is one name from `python -m tests.fuzz list`, or all (the default); SECONDS is the
# time per target (default 300). Exit status 0 when nothing was found, 1 when a target
# found something (each finding is saved as <work>/<target>/crash-<sha1> and listed at the
# end), 2 on a usage error.
#
# Environment:
#   FUZZ_ENGINE  auto (default): atheris when it installs, else hypothesis; or atheris,
#                or hypothesis
#   FUZZ_WORK    folder for working corpora and findings (default: a new temporary one)
#   FUZZ_DEPS    where atheris is installed, outside the checkout
#                (default: ${XDG_CACHE_HOME:-~/.cache}/permitgate-fuzz)
#   PYTHON       the interpreter (default: .venv/bin/python, set up on first use)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."

usage() {
    sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

target="${1:-all}"
seconds="${2:-300}"
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || usage
[ $# -le 2 ] || usage

if [ -z "${PYTHON:-}" ]; then
    [ -x .venv/bin/python ] || scripts/bootstrap.sh dev
    PYTHON=.venv/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

mapfile -t all < <("$PYTHON" -m tests.fuzz list | awk '{print $1}')
if [ "$target" = all ]; then
    targets=("${all[@]}")
elif printf '%s\n' "${all[@]}" | grep -qx -- "$target"; then
    targets=("$target")
else
    echo "fuzz: unknown target '$target' (known: ${all[*]})" >&2
    exit 2
fi

engine="${FUZZ_ENGINE:-auto}"
deps="${FUZZ_DEPS:-${XDG_CACHE_HOME:-$HOME/.cache}/permitgate-fuzz}"
case "$engine" in
    auto|atheris)
        if ! PYTHONPATH="$deps:$PYTHONPATH" "$PYTHON" -c 'import atheris' 2>/dev/null; then
            echo "fuzz: installing atheris into $deps (binary wheels only)"
            # Binary wheels only: atheris publishes manylinux x86_64 wheels; elsewhere (a
            # Pi's aarch64) building it needs clang with libFuzzer, which Debian's python
            # images lack, and a failed source build takes minutes to say so.
            if ! "$PYTHON" -m pip install --quiet --disable-pip-version-check \
                    --only-binary=:all: --target "$deps" atheris; then
                if [ "$engine" = atheris ]; then
                    echo "fuzz: atheris cannot be installed here" >&2
                    exit 2
                fi
                echo "fuzz: no atheris wheel for this machine: using hypothesis instead"
                engine=hypothesis
            fi
        fi
        if [ "$engine" != hypothesis ]; then
            engine=atheris
            export PYTHONPATH="$deps:$PYTHONPATH"
        fi
        ;;
    hypothesis) ;;
    *) echo "fuzz: FUZZ_ENGINE must be auto, atheris or hypothesis" >&2; exit 2 ;;
esac

work="${FUZZ_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/permitgate-fuzz.XXXXXX")}"
mkdir -p "$work"
echo "fuzz: ${#targets[@]} target(s), $seconds s each, engine $engine, work folder $work"

status=0
for name in "${targets[@]}"; do
    # libFuzzer's -max_total_time and the hypothesis rounds end the run within seconds of
    # the limit; this outer bound (atheris instruments ~14,000 functions at start-up, which
    # takes a few seconds) only ends a run wedged outside any one input.
    if ! timeout --kill-after=10 "$((seconds + 120))" \
            "$PYTHON" -m tests.fuzz run "$name" "$seconds" --engine "$engine" --work "$work"
    then
        status=1
    fi
done

shopt -s nullglob
found=("$work"/*/crash-* "$work"/*/timeout-* "$work"/*/oom-*)
if [ ${#found[@]} -gt 0 ]; then
    echo
    echo "fuzz: findings (replay: python -m tests.fuzz replay TARGET FILE):"
    printf '  %s\n' "${found[@]}"
    echo "Keep each as tests/fuzz_corpus/<target>/crash-<what>, report it, and list it in"
    echo "KNOWN_BUGS (tests/fuzz/common.py) until it is fixed."
    status=1
fi
exit "$status"

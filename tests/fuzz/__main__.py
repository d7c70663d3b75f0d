"""Run the fuzz targets for minutes: ``python -m tests.fuzz`` (scripts/fuzz.sh wraps it).

    python -m tests.fuzz list
    python -m tests.fuzz run TARGET SECONDS [--engine auto|atheris|hypothesis] [--work DIR]
    python -m tests.fuzz replay TARGET [FILE ...]
    python -m tests.fuzz seed [TARGET ...]

``run`` fuzzes one target until SECONDS have passed, then exits by itself: 0 when nothing
was found, 1 with the finding saved as ``DIR/<target>/crash-<sha1>`` (copy it into
tests/fuzz_corpus/<target>/ and add a KnownBug for it). With atheris (coverage-guided
libFuzzer) when it imports, else with hypothesis, in rounds of fresh random examples.
Inputs that reproduce a known, unfixed bug (``KNOWN_BUGS``) are not findings in a run,
so a run looks past them.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import logging
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import structlog
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import HypothesisException

from tests.fuzz import targets
from tests.fuzz.common import Target, corpus_dir, corpus_files, known_bug, tolerant
from tests.fuzz.strategies import inputs

HANG_S = 10
"""One input running longer than this is a hang (libFuzzer's -timeout)."""
INSTRUMENTED = ["agent", "drivers", "protocol", "provisioning", "common"]
"""The packages atheris instruments for coverage: the project's own. Instrumenting every
loaded module (pydantic, hypothesis, cryptography: ~14,000 functions) takes about two
minutes at each start and guides the fuzzer into code that is not ours."""
RSS_LIMIT_MB = 2048
"""More memory than this for one input is a finding (libFuzzer's -rss_limit_mb)."""
ROUND = 100
"""Hypothesis examples per round; the time limit is checked between rounds, so a run
ends at most one round (a few seconds for the slowest target) after it."""


def _quiet() -> None:
    """The parsers log every refusal: millions of lines in a run say nothing."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))


def _work(root: Path, target: Target) -> tuple[Path, Path]:
    """The working corpus (seeds and every corpus file that is no known bug) and the
    folder findings go to."""
    corpus, found = root / target.name / "corpus", root / target.name
    corpus.mkdir(parents=True, exist_ok=True)
    for path in corpus_files(target.name):
        if known_bug(target.name, path.name) is None:
            shutil.copy(path, corpus / path.name)
    for i, seed in enumerate(target.seeds()):
        (corpus / f"seed-{i}").write_bytes(seed)
    return corpus, found


def run_atheris(name: str, seconds: int, root: Path) -> int:
    """Coverage-guided fuzzing with libFuzzer; never returns (libFuzzer exits)."""
    atheris: Any = importlib.import_module("atheris")
    with atheris.instrument_imports(include=INSTRUMENTED):
        known = targets()
    if name not in known:
        print(f"fuzz: unknown target {name!r} (known: {', '.join(sorted(known))})",
              file=sys.stderr)
        return 2
    target = known[name]
    corpus, found = _work(root, target)
    args = [sys.argv[0], str(corpus), f"-max_total_time={seconds}", f"-max_len={target.max_len}",
            f"-timeout={HANG_S}", f"-rss_limit_mb={RSS_LIMIT_MB}",
            f"-artifact_prefix={found}/", "-print_final_stats=1"]
    print(f"fuzz: {target.name} with atheris for {seconds} s; findings go to {found}/",
          flush=True)
    atheris.Setup(args, tolerant(target))
    atheris.Fuzz()
    return 0  # not reached


def run_hypothesis(target: Target, seconds: int, root: Path) -> int:
    """Rounds of hypothesis examples until ``seconds`` have passed; 1 on a finding."""
    _, found = _work(root, target)
    fn = tolerant(target)
    failing: list[bytes] = []
    deadline = time.monotonic() + seconds
    rounds = examples = 0
    print(f"fuzz: {target.name} with hypothesis for {seconds} s; findings go to {found}/",
          flush=True)

    @settings(max_examples=ROUND, deadline=HANG_S * 1000, database=None, derandomize=False,
              phases=[Phase.generate, Phase.shrink], print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(inputs(target))
    def once(data: bytes) -> None:
        try:
            fn(data)
        except BaseException:
            failing.append(data)  # the last one is the shrunk example
            raise

    while time.monotonic() < deadline:
        try:
            once()
        except (Exception, HypothesisException):  # noqa: BLE001 - any failure is a finding
            data = failing[-1]
            path = found / f"crash-{hashlib.sha1(data).hexdigest()}"  # noqa: S324 - a name
            path.write_bytes(data)
            print(f"fuzz: {target.name}: finding in round {rounds + 1}, saved as {path}",
                  flush=True)
            try:
                target.fn(data)
            except Exception:  # noqa: BLE001 - shown, not handled
                traceback.print_exc()
            return 1
        rounds += 1
        examples += ROUND
    print(f"fuzz: {target.name}: nothing found in {rounds} rounds (up to {examples} "
          "examples)", flush=True)
    return 0


def replay(target: Target, files: list[Path]) -> int:
    """Run ``target`` on each file; report each outcome; 1 if any failed."""
    failed = 0
    for path in files or corpus_files(target.name):
        try:
            target.fn(path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - reported, not handled
            failed += 1
            bug = known_bug(target.name, path.name)
            print(f"FAIL {path}: {type(exc).__name__}: {exc}"
                  + (f" (known: {bug.reason})" if bug else ""))
        else:
            print(f"ok   {path}")
    return 1 if failed else 0


def seed(names: list[str]) -> int:
    """Write each target's seeds as ``seed-N`` into its corpus folder."""
    for name in names or sorted(targets()):
        folder = corpus_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        seeds = targets()[name].seeds()
        for i, data in enumerate(seeds):
            (folder / f"seed-{i}").write_bytes(data)
        print(f"{name}: {len(seeds)} seeds in {folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line (module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the targets")
    run = sub.add_parser("run", help="fuzz one target for SECONDS")
    run.add_argument("target")
    run.add_argument("seconds", type=int)
    run.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    run.add_argument("--work", type=Path, default=None,
                     help="folder for the working corpus and findings (default: a new one "
                          "under the temporary folder)")
    rep = sub.add_parser("replay", help="run a target on corpus files")
    rep.add_argument("target")
    rep.add_argument("files", nargs="*", type=Path)
    sd = sub.add_parser("seed", help="write the seed inputs into tests/fuzz_corpus/")
    sd.add_argument("targets", nargs="*", metavar="TARGET")
    args = parser.parse_args(argv)
    _quiet()
    if args.command == "run":
        engine = args.engine
        if engine == "auto":
            try:
                importlib.import_module("atheris")
                engine = "atheris"
            except ImportError:
                engine = "hypothesis"
        work = args.work or Path(tempfile.mkdtemp(prefix="permitgate-fuzz-"))
        if engine == "atheris":
            # The targets are imported under instrumentation there, so not before.
            return run_atheris(args.target, args.seconds, work)
    known = targets()
    names = [args.target] if args.command in ("run", "replay") else (
        args.targets if args.command == "seed" else [])
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown target(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    if args.command == "list":
        for name, target in sorted(known.items()):
            print(f"{name:16} {target.doc}")
        return 0
    if args.command == "replay":
        return replay(known[args.target], args.files)
    if args.command == "seed":
        return seed(args.targets)
    return run_hypothesis(known[args.target], args.seconds, work)


if __name__ == "__main__":
    sys.exit(main())

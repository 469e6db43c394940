#!/usr/bin/env python3
"""Soak the stateful CRDT machines of tests/crdt with fresh random seeds.

Every ``RuleBasedStateMachine`` defined in tests/crdt (room log, delta replication of the
AWLWWMap over full-mesh, non-transitive and line topologies) is run again and again, each run
with its own seed, no example database and ``derandomize=False``, until the time is up:

    .venv/bin/python scripts/soak_crdt.py --minutes 30
    .venv/bin/python scripts/soak_crdt.py --minutes 5 --machines roomlog --examples-per-seed 200

or once per listed seed, a cheap fixed sweep:

    .venv/bin/python scripts/soak_crdt.py --seeds 1-12
    .venv/bin/python scripts/soak_crdt.py --seeds 1,2,3 --machines awlwwmap,line

One line per run (machine, seed, examples, seconds, result), then a summary: runs, examples,
failures, and for every failed run its seed, a command that replays it and what hypothesis
printed (the shrunk step sequence, the traceback, the ``@reproduce_failure`` blob). Exit status
1 if any run failed, else 0 (128 + the signal if SIGINT or SIGTERM stopped it early: the first
signal lets the run in progress finish and still prints the summary).

Examples per run: ``--examples-per-seed``, else the machine's own count under the loaded
hypothesis profile (``HYPOTHESIS_PROFILE``, default ``ci``; see tests/conftest.py and
docs/TESTING.md). A run in progress when the time is up is finished, so a soak can overrun by
one run (seconds; longer if that run fails and shrinks).
"""

from __future__ import annotations

import argparse
import importlib
import os
import secrets
import signal
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import hypothesis
from hypothesis import settings
from hypothesis.reporting import with_reporter
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test
from hypothesis.statistics import collector
from hypothesis.utils.dynamicvariables import DynamicVariable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.conftest and tests.crdt.*, imported in discover()
MACHINE_DIR = ROOT / "tests" / "crdt"
# short names for --machines; a machine not listed here is found all the same and named after
# its class (lower case, without "machine")
SHORT_NAMES = {
    "RoomLogMachine": "roomlog",
    "ReplicationMachine": "awlwwmap",
    "NonTransitiveReplication": "nontransitive",
    "LineReplication": "line",
}


@dataclass
class Machine:
    name: str
    cls: type[RuleBasedStateMachine]
    base: settings  # the settings pytest runs it with (TestCase.settings, profile applied)
    # a subclass of the same name that carries the per-run seed, so that the test class
    # itself is never changed
    seeded: type[RuleBasedStateMachine] = field(init=False)

    def __post_init__(self) -> None:
        cls = self.cls
        self.seeded = types.new_class(cls.__name__, (cls,))
        self.seeded.__module__ = cls.__module__
        self.seeded.__qualname__ = cls.__qualname__


@dataclass
class Outcome:
    machine: str
    seed: int
    asked: int  # max_examples of the run
    examples: int  # test cases generated (fewer than asked if it failed)
    seconds: float
    error: str = ""  # one line: exception type and first line of the message
    details: str = ""  # what hypothesis printed: steps, traceback, blob


@dataclass
class Tally:
    runs: int = 0
    examples: int = 0
    failures: int = 0
    seconds: float = 0.0


def profile_name() -> str:
    return os.environ.get("HYPOTHESIS_PROFILE", "ci")


def discover() -> list[Machine]:
    """Every RuleBasedStateMachine defined in tests/crdt/test_*.py, in file order."""
    # registers the hypothesis profiles and loads HYPOTHESIS_PROFILE, as pytest does, before
    # the test modules compute their settings at import
    importlib.import_module("tests.conftest")
    found: list[Machine] = []
    for path in sorted(MACHINE_DIR.glob("test_*.py")):
        if "RuleBasedStateMachine" not in path.read_text(encoding="utf-8"):
            continue
        module = importlib.import_module(f"tests.crdt.{path.stem}")
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, RuleBasedStateMachine)
                and value.__module__ == module.__name__
            ):
                name = SHORT_NAMES.get(value.__name__)
                if name is None:
                    name = value.__name__.lower().removesuffix("machine")
                found.append(Machine(name, value, value.TestCase.settings))
    return found


# hypothesis hands each run's engine statistics to this hook (the pytest plugin uses it for
# --hypothesis-show-statistics); typed as holding None only
_statistics_hook = cast("DynamicVariable[Callable[[Any], None] | None]", collector)


@contextmanager
def capture_statistics(sink: list[Any]) -> Iterator[None]:
    with _statistics_hook.with_value(sink.append):
        yield


def examples_run(stats: list[Any]) -> int:
    """Test cases hypothesis generated (valid or failing); shrinking is not counted."""
    count = 0
    for run in stats:
        for phase in ("reuse-phase", "generate-phase"):
            cases = run.get(phase, {}).get("test-cases", [])
            count += sum(1 for case in cases if case.get("status") in ("valid", "interesting"))
    return count


def one_line(err: BaseException) -> str:
    if isinstance(err, BaseExceptionGroup):  # hypothesis found several distinct failures
        return f"{len(err.exceptions)} distinct: " + "; ".join(map(one_line, err.exceptions))
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def run_one(machine: Machine, seed: int, examples: int) -> Outcome:
    hypothesis.seed(seed)(machine.seeded)
    run_settings = settings(
        machine.base,
        max_examples=examples,
        database=None,
        derandomize=False,
        print_blob=True,
    )
    stats: list[Any] = []
    reported: list[str] = []
    start = time.perf_counter()
    error: Exception | None = None
    try:
        with capture_statistics(stats), with_reporter(lambda text: reported.append(str(text))):
            run_state_machine_as_test(machine.seeded, settings=run_settings)
    except Exception as err:  # the failure hypothesis found (or an ExceptionGroup of them)
        error = err
    seconds = time.perf_counter() - start
    outcome = Outcome(machine.name, seed, examples, examples_run(stats), seconds)
    if error is not None:
        outcome.error = one_line(error)
        outcome.details = "\n".join([*reported, "".join(traceback.format_exception(error))])
    return outcome


def parse_seeds(text: str) -> list[int]:
    """``1,2,5-9`` -> [1, 2, 5, 6, 7, 8, 9]"""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad seed or range {part!r}") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError("seeds are non-negative integers, e.g. 1,2,3 or 1-12")
    return list(dict.fromkeys(seeds))


def parse_args(argv: list[str] | None, machines: list[Machine]) -> argparse.Namespace:
    names = [m.name for m in machines]
    parser = argparse.ArgumentParser(
        description="Run the stateful CRDT machines of tests/crdt with fresh random seeds.",
        epilog=f"machines: {', '.join(names)}",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--minutes", type=float, help="soak: fresh random seeds, round robin, for this long"
    )
    mode.add_argument(
        "--seeds", type=parse_seeds, help="sweep: each of these seeds once per machine (1,2,5-9)"
    )
    parser.add_argument(
        "--machines",
        default=",".join(names),
        help="comma-separated subset of the machines (default: all)",
    )
    parser.add_argument(
        "--examples-per-seed",
        type=int,
        metavar="K",
        help="examples per run (default: the machine's count under the loaded profile)",
    )
    args = parser.parse_args(argv)
    chosen = [n.strip() for n in args.machines.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown or not chosen:
        parser.error(f"unknown machine(s) {', '.join(unknown)}; known: {', '.join(names)}")
    args.machines = list(dict.fromkeys(chosen))
    if args.minutes is not None and args.minutes <= 0:
        parser.error("--minutes must be positive")
    if args.examples_per_seed is not None and args.examples_per_seed < 1:
        parser.error("--examples-per-seed must be at least 1")
    return args


def replay_command(outcome: Outcome) -> str:
    env = "" if profile_name() == "ci" else f"HYPOTHESIS_PROFILE={profile_name()} "
    return (
        f"{env}.venv/bin/python scripts/soak_crdt.py --machines {outcome.machine} "
        f"--seeds {outcome.seed} --examples-per-seed {outcome.asked}"
    )


class StopRequest:
    """SIGINT or SIGTERM: finish the run in progress, print the summary, exit.

    An exception raised from a signal handler inside hypothesis is not reliable: it can come
    out as a bogus failure (FlakyStrategyDefinition) and the soak goes on. So the first signal
    only sets a flag, checked between runs; a second Ctrl-C interrupts at once, and the run it
    breaks is not counted.
    """

    def __init__(self) -> None:
        self.signum = 0
        self.hard = False
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.signum and signum == signal.SIGINT:
            self.hard = True
            raise KeyboardInterrupt
        self.signum = self.signum or signum


def main(argv: list[str] | None = None) -> int:
    machines = discover()
    args = parse_args(argv, machines)
    by_name = {m.name: m for m in machines}
    selected = [by_name[n] for n in args.machines]
    stop = StopRequest()

    def examples_for(machine: Machine) -> int:
        return args.examples_per_seed or machine.base.max_examples

    counts = ", ".join(f"{m.name} {examples_for(m)}" for m in selected)
    if args.seeds is not None:
        plan = f"sweep over {len(args.seeds)} seed(s)"
    else:
        plan = f"soak for {args.minutes:g} min, fresh seeds"
    print(
        f"# soak_crdt: {plan}; hypothesis {hypothesis.__version__}, profile {profile_name()}; "
        f"examples per run: {counts}",
        flush=True,
    )

    def runs() -> Iterator[tuple[Machine, int]]:
        if args.seeds is not None:
            for s in args.seeds:
                for m in selected:
                    if stop.signum:
                        return
                    yield m, s
            return
        deadline = time.monotonic() + args.minutes * 60
        used: set[int] = set()
        while True:
            for m in selected:
                if stop.signum or time.monotonic() >= deadline:
                    return
                s = secrets.randbelow(2**32)
                while s in used:
                    s = secrets.randbelow(2**32)
                used.add(s)
                yield m, s

    width = max(len(m.name) for m in selected)
    tallies = {m.name: Tally() for m in selected}
    failed: list[Outcome] = []
    start = time.monotonic()
    try:
        for machine, seed in runs():
            outcome = run_one(machine, seed, examples_for(machine))
            if stop.hard:  # a second Ctrl-C broke this run: its result means nothing
                break
            tally = tallies[machine.name]
            tally.runs += 1
            tally.examples += outcome.examples
            tally.seconds += outcome.seconds
            result = "ok"
            if outcome.error:
                tally.failures += 1
                failed.append(outcome)
                result = f"FAIL {outcome.error}"
            print(
                f"{machine.name:<{width}}  seed={seed:<10d}  examples={outcome.examples:>5d}  "
                f"seconds={outcome.seconds:7.1f}  {result}",
                flush=True,
            )
    except KeyboardInterrupt:
        stop.hard = True
    if stop.signum:
        what = "interrupted" if stop.hard else "stopped after the run in progress"
        print(f"# {signal.Signals(stop.signum).name}: {what}", flush=True)

    total = Tally(
        runs=sum(t.runs for t in tallies.values()),
        examples=sum(t.examples for t in tallies.values()),
        failures=sum(t.failures for t in tallies.values()),
    )
    print()
    print(
        f"# summary: {total.runs} runs, {total.examples} examples, {total.failures} failures "
        f"in {time.monotonic() - start:.0f} s (profile {profile_name()})"
    )
    for name, t in tallies.items():
        print(
            f"#   {name:<{width}}  runs={t.runs:<5d} examples={t.examples:<7d} "
            f"failures={t.failures:<4d} seconds={t.seconds:.0f}"
        )
    if failed:
        print("# failed seeds: " + ", ".join(f"{o.machine}:{o.seed}" for o in failed))
    for o in failed:
        print()
        print(f"## FAIL {o.machine} seed={o.seed} after {o.examples} examples: {o.error}")
        print(f"## replay: {replay_command(o)}")
        print(o.details.rstrip())
    sys.stdout.flush()
    if failed:
        return 1
    return 128 + stop.signum if stop.signum else 0


if __name__ == "__main__":
    sys.exit(main())

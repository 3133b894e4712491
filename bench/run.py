"""Run the benchmark scenarios side by side and record them in bench/RESULTS.md (plus JSON in bench/out/).

    ./run bench                  every scenario (python -m bench.run, from the repository's root)
    ./run bench proxy            one scenario
    ./run bench --quick          shorter measurements (smoke run)

Exits 1 when a scenario misses one of its targets (bench/targets.py).
"""

from __future__ import annotations

import argparse
import sys
import time

from bench import (
    canary, instructions, memory, processes, proxy_overhead, reaction, replicas, sentinel, services, shadow, switching,
)
from bench.common import HERE, machine, save

SCENARIOS = {
    "proxy": proxy_overhead,
    "instructions": instructions,
    "switching": switching,
    "reaction": reaction,
    "memory": memory,
    "services": services,
    "replicas": replicas,
    "canary": canary,
    "shadow": shadow,
    "sentinel": sentinel,
    "processes": processes,
}


def _sections(text: str) -> dict[str, str]:
    """The scenario sections of RESULTS.md, each between its own markers."""
    found = {}
    for name in SCENARIOS:
        start, end = f"<!-- scenario:{name} -->", f"<!-- /scenario:{name} -->"
        if start in text and end in text:
            found[name] = text[text.index(start): text.index(end) + len(end)]
    return found


def _met(result: dict[str, object]) -> bool:
    """Whether every ``target_met`` in a scenario's result (at any depth) is true."""
    def walk(value: object) -> list[bool]:
        if isinstance(value, dict):
            own = [bool(value["target_met"])] if "target_met" in value else []
            return own + [flag for v in value.values() for flag in walk(v)]
        return []
    return all(walk(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", help="scenarios to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="short measurements, for a smoke run")
    args = parser.parse_args()
    chosen = args.scenarios or list(SCENARIOS)
    info = machine()
    results = HERE / "RESULTS.md"
    # Scenarios not run this time keep their last recorded section.
    kept = _sections(results.read_text()) if results.exists() else {}
    command = f"./run bench{' --quick' if args.quick else ''}{' ' + ' '.join(args.scenarios) if args.scenarios else ''}"
    new: dict[str, str] = {}
    missed = []
    for name in chosen:
        module = SCENARIOS[name]
        started = time.monotonic()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        result = module.run(quick=args.quick)
        result["seconds"] = round(time.monotonic() - started, 1)
        result["machine"] = info
        save(name, result)
        if not _met(result):
            missed.append(name)
        lines = module.table(result)
        print("\n".join(lines), flush=True)
        new[name] = "\n".join([
            f"<!-- scenario:{name} -->", *lines, "",
            f"_({name}: {result['seconds']} s; measured {info['date']} on {info['cores']} cores ({info['cpu']}), "
            f"Linux {info['kernel']}, Python {info['python']}, load average before {info['load_before']:.2f}; "
            f"`{command}`)_",
            f"<!-- /scenario:{name} -->",
        ])
    sections = {**kept, **new}
    body = [
        "# Benchmark results",
        "",
        "Every figure in a table was measured side by side in the same run; compare ratios, not absolute numbers "
        "(this machine is shared: absolute figures move by 2-3x between runs). Each section says when and how it "
        "was measured.",
        "",
    ]
    for name in SCENARIOS:
        if name in sections:
            body += [sections[name], ""]
    results.write_text("\n".join(body))
    print(f"bench: wrote {HERE / 'RESULTS.md'}", file=sys.stderr)
    if missed:
        print(f"bench: targets missed in {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

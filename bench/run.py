"""Run the benchmark scenarios side by side and record them in bench/RESULTS.md (plus JSON in bench/out/).

    ./run bench                  every scenario
    ./run bench proxy            one scenario
    ./run bench --quick          shorter measurements (smoke run)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import memory, proxy_overhead, reaction, switching  # noqa: E402
from bench.common import HERE, machine, save  # noqa: E402

SCENARIOS = {
    "proxy": proxy_overhead,
    "switching": switching,
    "reaction": reaction,
    "memory": memory,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", help="scenarios to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="short measurements, for a smoke run")
    args = parser.parse_args()
    chosen = args.scenarios or list(SCENARIOS)
    info = machine()
    sections = [
        "# Benchmark results",
        "",
        f"Measured {info['date']} on {info['cores']} cores ({info['cpu']}), {info['memory_mb']} MB RAM, "
        f"Linux {info['kernel']}, Python {info['python']}; load average before the run {info['load_before']:.2f}. "
        "Every figure in a table was measured side by side in the same run; compare ratios, not absolute numbers.",
        "",
        f"Command: `./run bench{' --quick' if args.quick else ''}{' ' + ' '.join(args.scenarios) if args.scenarios else ''}`",
        "",
    ]
    for name in chosen:
        module = SCENARIOS[name]
        started = time.monotonic()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        result = module.run(quick=args.quick)
        result["seconds"] = round(time.monotonic() - started, 1)
        result["machine"] = info
        save(name, result)
        lines = module.table(result)
        print("\n".join(lines), flush=True)
        sections += [*lines, "", f"_({name}: {result['seconds']} s)_", ""]
    (HERE / "RESULTS.md").write_text("\n".join(sections) + "\n")
    print(f"bench: wrote {HERE / 'RESULTS.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

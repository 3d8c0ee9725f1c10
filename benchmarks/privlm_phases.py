"""Where privlm's side of the pfl race spends its command (issue #22.2): phase by phase.

Runs ``vs_pfl.privlm_side`` (the race's own workload and config) in this process and stamps
``Simulation.run``: imports, set-up (corpus, model, the budget check's round PLD), round 1, each
later round, and what follows the last round (final epsilon, resume state, report.html).
``--predynamo`` imports ``torch._dynamo`` first: torch imports it lazily at the first
``torch.optim`` constructor, which would otherwise land in round 1.

    python benchmarks/privlm_phases.py --case 12x16 --reps 2 --out benchmarks/out
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def one(case: str, processes: int, predynamo: bool) -> dict:
    t0 = time.perf_counter()
    import torch  # noqa: F401

    import privlm.api as api
    import vs_pfl

    phases: dict = {"imports_s": time.perf_counter() - t0}
    if predynamo:
        t = time.perf_counter()
        import torch._dynamo  # noqa: F401

        phases["dynamo_import_s"] = time.perf_counter() - t
    stamps: dict = {}
    real_run = api.Simulation.run

    def run(self, *a, **k):
        stop, ends = k.get("stop_when"), []

        def stamp(row):
            ends.append(time.perf_counter())
            return stop(row) if stop else False

        k["stop_when"] = stamp
        start = time.perf_counter()
        res = real_run(self, *a, **k)
        stamps.update(start=start, ends=ends, done=time.perf_counter())
        return res

    api.Simulation.run = run  # type: ignore[method-assign]
    out = vs_pfl.privlm_side(case, processes, None)
    ends = stamps["ends"]
    phases.update(case=case, processes=processes, predynamo=predynamo, setup_s=out["setup_s"],
                  round1_s=ends[0] - stamps["start"], later_rounds_s=[b - a for a, b in zip(ends, ends[1:])],
                  after_last_round_s=stamps["done"] - ends[-1], steady_updates_per_s=out["steady_updates_per_s"])
    return phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="12x16")
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument("--one", choices=["plain", "predynamo"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("PHASES_JSON " + json.dumps(one(args.case, args.processes, args.one == "predynamo")))
        return
    rows = []
    for _rep in range(args.reps):  # alternated, each in a fresh process (imports are a phase)
        for variant in ("plain", "predynamo"):
            proc = subprocess.run([sys.executable, __file__, "--case", args.case, "--processes", str(args.processes),
                                   "--one", variant], capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.split("PHASES_JSON ", 1)[1])
            rows.append(row)
            print(f"{variant:9s} imports {row['imports_s']:.2f}"
                  + (f" (+dynamo {row['dynamo_import_s']:.2f})" if variant == "predynamo" else "")
                  + f"  setup {row['setup_s']:.2f}  round 1 {row['round1_s']:.2f}  later rounds "
                  + " ".join(f"{x:.2f}" for x in row["later_rounds_s"])
                  + f"  after last {row['after_last_round_s']:.2f}  steady {row['steady_updates_per_s']:.1f} updates/s",
                  flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"privlm_phases_{args.case}_{args.processes}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()

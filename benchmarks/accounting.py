"""Accounting: how tight privlm's epsilon is, and what it costs per round (issue #18.6).

1. Tightness: privlm's epsilon against dp-accounting's stock ``PLDAccountant`` at its default
   discretization (1e-4) on a grid q in [1e-4, 1], z in [0.3, 10], T up to 10,000; and what
   the old 1e-3 grid reported on the same grid.
2. Cost per round: a run's accounting loop (budget check every round, exact epsilon at every
   checkpoint) over T rounds, against the old loop (an accountant call every round at 1e-3).

    python benchmarks/accounting.py --out benchmarks/out/accounting   [--quick]

Prints a table and writes ``accounting.json`` (resumable: finished grid cases are kept).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import dp_accounting
from dp_accounting import pld

from privlm.privacy.accountant import BudgetCheck, epsilon, epsilon_for, round_event


def stock(q: float, z: float, T: int, delta: float, interval: float | None = None) -> float:
    acc = pld.PLDAccountant() if interval is None else pld.PLDAccountant(value_discretization_interval=interval)
    acc.compose(dp_accounting.SelfComposedDpEvent(round_event(q, z), T))
    return float(acc.get_epsilon(delta))


def tightness(out: dict, quick: bool, save) -> None:
    qs = (1e-4, 1e-3, 1e-2, 0.1, 1.0)
    zs = (0.3, 1.0, 3.0, 10.0)
    Ts = (1, 100, 1000) if quick else (1, 100, 1000, 10000)
    cases = [(q, z, T, 1e-6) for q in qs for z in zs for T in Ts] + [(0.002, 1.3, 5000, 1e-7),
                                                                      (0.01, 1.0, 1000, 1e-5)]
    done = {tuple(r["case"]) for r in out.setdefault("tightness", [])}
    for case in cases:
        if case in done:
            continue
        q, z, T, d = case
        t0 = time.perf_counter()
        ours = epsilon(q, z, T, d)
        t1 = time.perf_counter()
        ref = stock(q, z, T, d)
        old = stock(q, z, T, d, interval=1e-3)
        rel = (ours - ref) / ref if ref not in (0.0, float("inf")) else 0.0
        old_rel = (old - ref) / ref if ref not in (0.0, float("inf")) else 0.0
        out["tightness"].append({"case": list(case), "privlm": ours, "stock_1e-4": ref, "old_1e-3": old,
                                 "rel_dev": rel, "old_rel_dev": old_rel, "seconds": round(t1 - t0, 3)})
        print(f"q={q:<7g} z={z:<5g} T={T:<6d} delta={d:g}: privlm {ours:.6g}  stock {ref:.6g}  "
              f"dev {rel:+.2e}  (old 1e-3 grid: {old_rel:+.2e})", flush=True)
        save()


def loop_cost(q: float, z: float, T: int, delta: float, checkpoint_every: int) -> dict:
    """The new per-round accounting of a run: the budget check every round, epsilon at checkpoints."""
    event = round_event(q, z)
    budget = epsilon(q, z, T, delta) * (1 + 1e-9)  # a calibrated run: all T rounds fit
    events: list = []
    check = BudgetCheck(events, event, delta, "pld", budget, T)
    t0 = time.perf_counter()
    for r in range(1, T + 1):
        assert check.allows(r)
        events.append(event)
        if r % checkpoint_every == 0 or r == T:
            epsilon_for(events, delta)
    total = time.perf_counter() - t0
    return {"rounds": T, "checkpoint_every": checkpoint_every, "seconds": round(total, 3),
            "ms_per_round": round(1000 * total / T, 3), "budget_check_evaluations": check.evaluations}


def old_loop_cost(q: float, z: float, T: int, delta: float, samples: int = 20) -> dict:
    """The old loop: an accountant call (1e-3 grid) every round; timed at rounds near T."""
    events = [round_event(q, z)] * (T - samples)
    t0 = time.perf_counter()
    for _ in range(samples):
        events.append(round_event(q, z))
        epsilon_for(events, delta, "pld", 1e-3)
    ms = 1000 * (time.perf_counter() - t0) / samples
    return {"rounds": T, "ms_per_round_near_T": round(ms, 3)}


def ledger_write_cost(T: int = 10000, writes: int = 20) -> dict:
    """privacy.json written with a T-entry ledger: the new write (entries kept as JSON text since
    each append, spliced in) against the old one (to_list + json.dumps with indent)."""
    import tempfile

    from privlm.privacy import Ledger
    from privlm.rundir import RunDir, atomic_write

    ledger = Ledger()
    for r in range(1, T + 1):
        ledger.append(r, round_event(0.002, 1.3), clip_norm=2.0)
    header = {"mode": "user", "epsilon": None, "guarantee": "x" * 2000}
    with tempfile.TemporaryDirectory() as d:
        rd = RunDir(Path(d))
        t0 = time.perf_counter()
        for _ in range(writes):
            rd.write_privacy(header, ledger_json=ledger.to_json())
        new = (time.perf_counter() - t0) / writes
        t0 = time.perf_counter()
        for _ in range(writes):
            atomic_write(rd.privacy_path, (json.dumps({**header, "ledger": ledger.to_list()}, indent=2) + "\n").encode())
        old = (time.perf_counter() - t0) / writes
    return {"entries": T, "new_ms_per_write": round(1000 * new, 2), "old_ms_per_write": round(1000 * old, 2),
            "bytes": rd.privacy_path.stat().st_size if rd.privacy_path.exists() else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/accounting"))
    ap.add_argument("--quick", action="store_true", help="T up to 1,000 and shorter loops")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "accounting.json"
    out = json.loads(path.read_text()) if path.exists() else {}

    def save() -> None:
        path.write_text(json.dumps(out, indent=2) + "\n")

    if "cost" not in out:
        out["cost"] = []
        cases = [(0.002, 1.3, 1e-7, 1000 if args.quick else 10000),  # many rounds, small q
                 (0.01, 1.0, 1e-5, 1000),
                 (0.02, 0.46, 8.53e-5, 50)]  # the default run
        for q, z, d, T in cases:
            for every in (10, 1):
                rounds = min(T, 1000) if every == 1 else T  # every round: timed on the first 1,000
                row = loop_cost(q, z, rounds, d, every)
                row |= {"q": q, "z": z, "delta": d, "old": old_loop_cost(q, z, rounds, d)}
                out["cost"].append(row)
                print(f"cost q={q} z={z}: {row}", flush=True)
                save()
    if "ledger_write" not in out:
        out["ledger_write"] = ledger_write_cost()
        print(f"ledger write: {out['ledger_write']}", flush=True)
        save()
    tightness(out, args.quick, save)
    rows = [r for r in out["tightness"]]
    worst = max(rows, key=lambda r: abs(r["rel_dev"]))
    below = [r for r in rows if r["privlm"] < r["stock_1e-4"]]
    out["summary"] = {"cases": len(rows), "max_abs_rel_dev": abs(worst["rel_dev"]), "worst_case": worst["case"],
                      "cases_below_stock": len(below),
                      "old_max_rel_dev": max(r["old_rel_dev"] for r in rows)}
    save()
    print(json.dumps(out["summary"]), flush=True)


if __name__ == "__main__":
    main()

"""Privacy audit of the default synthetic-clinic run (issue #6): non-private vs ε ≈ 8 vs ε ≈ 1.

    python benchmarks/audit_clinic.py --out benchmarks/out [--canaries 200] [--repeats 10]

Each setting is the default `privlm run` (5,000 patients, 50 rounds, 100 expected
patients per round, scrubbing on) plus ``audit.canaries`` and
``audit.canary_repeats`` (and, in the DP settings, ``audit.update_canaries``
white-box canaries); then ``privlm audit`` with 5,000 reference secrets and 100
generations. A fourth setting turns scrubbing off to show what it buys. Prints one JSON object per setting and writes
``audit_clinic.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from privlm.audit import run_audit
from privlm.config import load_config
from privlm.api import Simulation

SETTINGS = {
    "non-private": ["privacy.mode=none"],
    "non-private-unscrubbed": ["privacy.mode=none", "data.scrub.enabled=false"],
    "eps8": ["privacy.target_epsilon=8", "audit.update_canaries={updates}"],
    "eps1": ["privacy.target_epsilon=1", "audit.update_canaries={updates}"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--canaries", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--updates", type=int, default=1000, help="white-box update canaries (DP runs)")
    ap.add_argument("--references", type=int, default=5000)
    ap.add_argument("--generations", type=int, default=100)
    ap.add_argument("--only", nargs="*", default=list(SETTINGS))
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra KEY=VALUE for every run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.only:
        overrides = [f"audit.canaries={args.canaries}", f"audit.canary_repeats={args.repeats}",
                     *(o.format(updates=args.updates) for o in SETTINGS[name]), *args.extra]
        cfg = load_config(None, overrides)
        t = time.perf_counter()
        res = Simulation(cfg).run(args.out / f"audit-{name}-{int(time.time())}", progress=False)
        train_s = time.perf_counter() - t
        a = run_audit(res.run_dir, args.references, args.generations)
        c, m, p = a["canaries"], a["membership"], a["pii"]
        row = {
            "setting": name, "overrides": overrides, "epsilon": res.epsilon, "delta": res.delta,
            "eval_accuracy": res.eval_accuracy, "train_seconds": round(train_s, 1),
            "canaries": c["count"], "included": c["included"],
            "exposure_included": c["exposure"]["included_mean"], "exposure_excluded": c["exposure"]["excluded_mean"],
            "exposure_included_extrapolated": c["exposure"]["included_mean_extrapolated"],
            "exposure_excluded_extrapolated": c["exposure"]["excluded_mean_extrapolated"],
            "one_run_correct": c["one_run"]["correct"], "one_run_guesses": c["one_run"]["guesses"],
            "epsilon_lower_bound_text": c["one_run"]["epsilon_lower_bound"],
            "update_canaries": a["update_canaries"]["count"] if a["update_canaries"] else None,
            "update_correct": a["update_canaries"]["one_run"]["correct"] if a["update_canaries"] else None,
            "update_guesses": a["update_canaries"]["one_run"]["guesses"] if a["update_canaries"] else None,
            "epsilon_lower_bound_update": (a["update_canaries"]["one_run"]["epsilon_lower_bound"]
                                           if a["update_canaries"] else None),
            "epsilon_lower_bound": a["epsilon_lower_bound"], "broken": a["broken"],
            "mia_auc": m["auc"] if m else None, "mia_tpr_at_1pct_fpr": m["tpr_at_1pct_fpr"] if m else None,
            "pii_generations": p["generations"], "pii_found": p["pii_found"],
            "pii_verbatim_in_training": p["verbatim_in_training_text"], "pii_exact": p["exact_continuation"],
            "run_dir": str(res.run_dir),
        }
        print(json.dumps(row), flush=True)
        results[name] = row
    (args.out / "audit_clinic.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

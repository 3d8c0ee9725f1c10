"""Chaos test: SIGKILL a run again and again, resume it each time, compare with an unbroken run.

A seeded run (test mode: seeded noise and sampling) is started; it is killed
with SIGKILL at a random place, then continued with ``privlm run --resume``,
killed again, and so on, ``--kills`` times, and finally allowed to finish.
Every kill is triggered by progress, never by a clock, so it lands at the same
place however fast or loaded the machine is: half at a random step of one of
the next three rounds (after its ledger entry, after aggregation, after the
metrics or the state were written), the other half inside a random file write
(temp file complete, not yet renamed), some of them inside checkpoint writes. Passing means: every resume
succeeded, and the final parameters (bit for bit), the final epsilon and the
ledger equal those of the same run done without interruption.

    python tools/chaos.py --kills 10 --out /tmp/chaos

The test suite runs a short version (tests/test_resume.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

# A small seeded run (synthetic clinic, tiny model): ~0.3 s a round on 2 cores. Scrubbing is off:
# its start-up time would dwarf the rounds the timer aims at (the kill-point tests in
# tests/test_resume.py resume runs with scrubbing on).
CONFIG = {
    "seed": 7,
    "data": {"source": "synthetic-clinic", "num_clients": 120, "scrub": {"enabled": False}},
    "model": {"n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 32},
    "client": {"local_steps": 2, "batch_size": 4, "optimizer": "adam", "lr": 0.01},
    "federation": {"rounds": 24, "clients_per_round": 12},
    "server": {"optimizer": "fedadam", "lr": 0.01},
    "privacy": {"mode": "user", "noise_multiplier": 1.0, "clip_norm": 1.0, "seeded_noise": True,
                "target_epsilon": 50.0},
    "eval": {"every": 4, "max_clients": 10},
    "output": {"checkpoint_every": 5},
}


def _privlm(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "privlm", *args, "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _final(run_dir: Path) -> dict:
    """What must be equal: the last checkpoint's bytes, the resume state, epsilon, the ledger."""
    priv = json.loads((run_dir / "privacy.json").read_text())
    ckpts = sorted((run_dir / "checkpoints").glob("round-*.safetensors"))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        m.pop("seconds")  # wall-clock time is the one thing allowed to differ
    return {
        "checkpoints": {p.name: p.read_bytes() for p in ckpts},
        "state": (run_dir / "state.safetensors").read_bytes(),
        "epsilon": priv["epsilon"],
        "ledger": priv["ledger"],
        "rounds_completed": priv["rounds_completed"],
        "metrics": metrics,
    }


def _rounds_done(run_dir: Path) -> int:
    """The last round whose metrics the run wrote (0 before the first)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["round"] if lines else 0


def chaos(base: Path, kills: int, seed: int = 0, config: dict | None = None,
          log=print) -> dict:
    """Run the chaos experiment under ``base``; return a summary (``ok`` says whether it passed)."""
    base.mkdir(parents=True, exist_ok=True)
    cfg_path = base / "config.toml"
    cfg_path.write_text(tomli_w.dumps(config or CONFIG))
    rng = random.Random(seed)

    t0 = time.perf_counter()
    ref = _privlm("run", str(cfg_path), "--out", str(base / "reference"))
    if ref.wait() != 0:
        raise RuntimeError(f"reference run failed: {ref.stderr.read()}")
    reference_seconds = time.perf_counter() - t0

    victim = base / "victim"
    events: list[dict] = []
    processes = 0
    while True:
        fresh = not (victim / "config.toml").exists()
        args = ("run", str(cfg_path), "--out", str(victim)) if fresh else ("run", "--resume", str(victim))
        env = dict(os.environ)
        how = None
        if len(events) < kills:
            # Even kills: a step of one of the next rounds. Odd kills alternate: inside a
            # checkpoint write, inside any write.
            how = "step" if len(events) % 2 == 0 else ("mid-write-checkpoint", "mid-write")[len(events) // 2 % 2]
            if how == "step":
                done = _rounds_done(victim)
                step = rng.choice(("ledger-written", "aggregated", "metrics-written", "state-written"))
                env["PRIVLM_CRASH_AT"] = f"{step}:{done + rng.randint(1, 3)}"
            else:
                env["PRIVLM_CRASH_AT"] = f"{how}:{rng.randint(1, 6 if how == 'mid-write' else 2)}"
        proc = _privlm(*args, env=env)
        processes += 1
        started = time.perf_counter()
        rc = proc.wait()
        stderr = proc.stderr.read()
        if rc == -signal.SIGKILL:
            state = json.loads((victim / "privacy.json").read_text()) if (victim / "privacy.json").exists() else {}
            events.append({"how": env.get("PRIVLM_CRASH_AT"),
                           "after_seconds": round(time.perf_counter() - started, 2),
                           "rounds_completed": state.get("rounds_completed"),
                           "ledger_entries": len(state.get("ledger", []))})
            log(f"kill {len(events)}: {events[-1]}")
            continue
        if rc != 0:
            return {"ok": False, "error": f"privlm exited {rc}: {stderr.strip()}", "kills": events}
        if len(events) >= kills:
            break
        log("run finished before all kills happened; the run is too short for this many kills")
        return {"ok": False, "error": "run finished early", "kills": events}

    a, b = _final(base / "reference"), _final(victim)
    mismatched = [k for k in a if a[k] != b[k]]
    return {
        "ok": not mismatched,
        "mismatched": mismatched,
        "kills": events,
        "processes": processes,
        "epsilon": b["epsilon"],
        "rounds_completed": b["rounds_completed"],
        "reference_seconds": round(reference_seconds, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("chaos-out"))
    args = ap.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"error: --out {args.out} is not empty")
    res = chaos(args.out, args.kills, args.seed)
    print(json.dumps(res, indent=2))
    sys.exit(0 if res["ok"] else 1)


if __name__ == "__main__":
    main()

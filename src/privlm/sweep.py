"""``privlm sweep``: one run per point of a grid of config values, and the privacy-utility curve.

``--set-grid privacy.target_epsilon=1,2,4,8,inf --set-grid privacy.adaptive_clipping=false,true``
runs every combination in process, each into its own run directory under
``OUT``, and writes ``sweep.json`` (every run's ε, δ, accuracy, loss), ``sweep.md``
(the same as a table) and ``sweep.png`` (held-out accuracy against ε, one line per
combination of the other grid keys). ``target_epsilon = inf`` means the
non-private run (``privacy.mode = "none"``), drawn as a horizontal line; it has no
clipping, so it runs once whatever the other keys say about clipping.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

from privlm.config import load_config, parse_override
from privlm.errors import ConfigError

EPSILON_KEY = "privacy.target_epsilon"
CLIPPING_KEYS = ("privacy.adaptive_clipping", "privacy.clip_norm", "privacy.target_quantile",
                 "privacy.clip_learning_rate", "privacy.clipped_count_stddev")


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["a.b=1,2"]`` -> ``[("a.b", ["1", "2"])]`` (values stay TOML text for ``--set``)."""
    grid = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set-grid {item!r}: expected KEY=V1,V2,...")
        key, raw = item.split("=", 1)
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not key.strip() or not values:
            raise ConfigError(f"--set-grid {item!r}: expected KEY=V1,V2,...")
        grid.append((key.strip(), values))
    if len({k for k, _ in grid}) != len(grid):
        raise ConfigError("--set-grid: a key is given twice")
    return grid


def points(grid: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Every combination; a non-private point once (clipping keys mean nothing there)."""
    seen, out = set(), []
    for combo in itertools.product(*(values for _, values in grid)):
        point = dict(zip((k for k, _ in grid), combo))
        if _non_private(point):
            point = {k: v for k, v in point.items() if k not in CLIPPING_KEYS}
        key = tuple(sorted(point.items()))
        if key not in seen:
            seen.add(key)
            out.append(point)
    return out


def _non_private(point: dict[str, str]) -> bool:
    value = point.get(EPSILON_KEY)
    return value is not None and math.isinf(float(parse_override(f"x={value}")[1]))


def overrides_for(point: dict[str, str]) -> list[str]:
    if _non_private(point):
        return ["privacy.mode=none", *(f"{k}={v}" for k, v in point.items() if k != EPSILON_KEY)]
    return [f"{k}={v}" for k, v in point.items()]


def _name(point: dict[str, str]) -> str:
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in point.items()) or "base"


def sweep(config: Path | None, sets: list[str], grid_items: list[str], out: Path, progress: bool = True,
          on_result=None) -> list[dict]:
    """Run the grid; returns one row per run (also written to ``out``)."""
    from privlm.api import run as run_one

    grid = parse_grid(grid_items)
    todo = points(grid)
    for point in todo:  # every point's config is valid before anything runs
        load_config(config, [*sets, *overrides_for(point)])
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for point in todo:
        cfg = load_config(config, [*sets, *overrides_for(point)])
        res = run_one(cfg, out / _name(point), progress=progress)
        row = {"point": point, "run_dir": str(res.run_dir), "epsilon": res.epsilon, "delta": res.delta,
               "eval_accuracy": res.eval_accuracy, "eval_loss": res.eval_loss,
               "rounds": res.rounds_completed, "stopped": res.stopped}
        rows.append(row)
        if on_result:
            on_result(row)
        write_outputs(rows, grid, out)
    return rows


def write_outputs(rows: list[dict], grid: list[tuple[str, list[str]]], out: Path) -> None:
    (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    keys = [k for k, _ in grid]
    lines = ["| " + " | ".join([*keys, "epsilon", "delta", "accuracy", "loss", "rounds"]) + " |",
             "|" + "---|" * (len(keys) + 5)]
    for r in rows:
        eps = "non-private" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        delta = "" if r["delta"] is None else f"{r['delta']:.3g}"
        lines.append("| " + " | ".join([*(r["point"].get(k, "-") for k in keys), eps, delta,
                                          f"{r['eval_accuracy']:.4f}", f"{r['eval_loss']:.4f}",
                                          str(r["rounds"])]) + " |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    _plot(rows, keys, out / "sweep.png")


def _plot(rows: list[dict], keys: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    others = [k for k in keys if k != EPSILON_KEY]
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["epsilon"] is None:
            ax.axhline(r["eval_accuracy"], color="gray", linestyle="--", label="non-private")
            continue
        label = ", ".join(f"{k.split('.')[-1]}={r['point'].get(k)}" for k in others) or "DP"
        series.setdefault(label, []).append((r["epsilon"], r["eval_accuracy"]))
    for label, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log")
    ticks = sorted({p[0] for pts in series.values() for p in pts})
    if ticks:  # label the epsilons that were run, as plain numbers
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel("user-level epsilon")
    ax.set_ylabel("held-out next-token accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

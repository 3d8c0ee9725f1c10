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
    write_sweep_report(rows, keys, out)


def write_sweep_report(rows: list[dict], keys: list[str], out: Path) -> None:
    """``sweep.html``: the runs side by side (each with its model, rounds, population, cohort and a link
    to its report.html), the accuracy-vs-epsilon plot, and the non-private baseline."""
    import base64
    import html

    from privlm.report.html import fmt
    from privlm.rundir import atomic_write

    heads = [*keys, "epsilon", "delta", "held-out accuracy", "held-out loss", "rounds", "population size",
             "clients per round", "model", "report"]
    body = []
    for r in rows:
        run_dir = Path(r["run_dir"])
        info = _run_info(run_dir)
        try:
            link = run_dir.resolve().relative_to(out.resolve()).as_posix() + "/report.html"
        except ValueError:
            link = (run_dir / "report.html").resolve().as_uri()
        cells = [*(html.escape(r["point"].get(k, "-")) for k in keys),
                 "non-private" if r["epsilon"] is None else fmt(r["epsilon"]), fmt(r["delta"]),
                 fmt(r["eval_accuracy"]), fmt(r["eval_loss"]), fmt(r["rounds"]),
                 fmt(info.get("num_clients")), fmt(info.get("clients_per_round")), html.escape(info.get("model", "")),
                 f'<a href="{html.escape(link)}">report</a>']
        if r.get("stopped"):
            cells[len(keys) + 4] += " (budget stop)"  # (the rounds column)
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    base = [r for r in rows if r["epsilon"] is None]
    note = (f"<p>Non-private baseline at the same compute: held-out accuracy {fmt(base[0]['eval_accuracy'])}.</p>"
            if base else "<p>No non-private baseline in this sweep (add <code>inf</code> to the epsilon grid).</p>")
    png = base64.b64encode((out / "sweep.png").read_bytes()).decode()
    head = "".join(f"<th>{html.escape(h)}</th>" for h in heads)
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>privlm sweep report</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;overflow-wrap:anywhere}}
.scroll{{overflow:auto;border:1px solid #ddd}} table{{border-collapse:collapse;font-size:0.9em}}
th,td{{padding:3px 8px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}} th{{background:#fafafa}}
img{{max-width:100%;height:auto}}</style></head><body>
<h1>privlm sweep report</h1>
<p>{len(rows)} runs over {html.escape(", ".join(keys))}. Each epsilon is its run's, recomputed from its ledger
(user-level unless the run says otherwise in its report); accuracy is next-token accuracy on the held-out text
of the run's clients (not covered by the guarantee).</p>
{note}
<img alt="held-out accuracy against epsilon" src="data:image/png;base64,{png}">
<div class="scroll"><table><tr>{head}</tr>{"".join(body)}</table></div>
</body></html>
"""
    atomic_write(out / "sweep.html", page.encode())


def _run_info(run_dir: Path) -> dict:
    """Model, population and cohort of a run, from its own files (empty where they cannot be read)."""
    from privlm.errors import PrivlmError
    from privlm.rundir import read_json

    info: dict = {}
    try:
        p = read_json(run_dir / "privacy.json")
        if not isinstance(p, dict):
            return info
        info.update({k: p.get(k) for k in ("num_clients", "clients_per_round")})
        cfg = load_config(run_dir / "config.toml")
        m = cfg.model
        info["model"] = (f"{m.path} + LoRA r={m.lora.r}" if m.kind == "hf" else
                         f"LSTM {m.lstm_layers} x {m.lstm_hidden}" if m.kind == "lstm" else
                         f"GPT {m.n_layer} x {m.n_embd}")
    except (OSError, ValueError, PrivlmError):
        pass
    return info


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

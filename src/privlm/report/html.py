"""``report.html``: a self-contained page a user keeps from a run: the summary, the guarantee,
the budget spent, curves (embedded PNGs), the per-round metrics as a table, sample generations
from the final checkpoint (from public prompts: ``[report] prompts``), and the scrub and audit
sections where present."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from privlm.rundir import RunDir, atomic_write  # noqa: E402

log = logging.getLogger(__name__)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plots(rows: list[dict]) -> dict[str, str]:
    out = {}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("train_loss", "train loss (clients)"), ("eval_loss", "held-out loss")):
        x, y = _series(rows, key)
        if x:
            a1.plot(x, y, label=label)
    a1.set_xlabel("round"), a1.set_ylabel("loss (nats/token)"), a1.legend(), a1.grid(alpha=0.3)
    x, y = _series(rows, "eval_accuracy")
    a2.plot(x, y, color="tab:green")
    a2.set_xlabel("round"), a2.set_ylabel("next-token accuracy"), a2.grid(alpha=0.3)
    out["learning"] = _png(fig)
    x, clients = _series(rows, "clients")
    if x:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.plot(x, clients, label="summed")
        for key in ("rejected", "dropped"):
            xs, ys = _series(rows, key)
            if any(ys):
                ax.plot(xs, ys, label=key)
        ax.set_xlabel("round"), ax.set_ylabel("clients"), ax.grid(alpha=0.3)
        pts = [(r["round"], r["clipped"] / r["clients"]) for r in rows if r.get("clipped") is not None and r.get("clients")]
        if pts:
            twin = ax.twinx()
            twin.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:purple", linestyle="--", label="clipped fraction")
            twin.set_ylabel("fraction of updates clipped"), twin.set_ylim(0, 1.05)
            twin.legend(loc="lower right")
        ax.legend(loc="upper left")
        out["clients"] = _png(fig)
    x, y = _series(rows, "epsilon")
    if x:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.plot(x, y, color="tab:red")
        ax.set_xlabel("round"), ax.set_ylabel("epsilon (from the ledger)"), ax.grid(alpha=0.3)
        out["epsilon"] = _png(fig)
    return out


def audit_section(rd: RunDir) -> str:
    """The audit's figures and an exposure histogram, if ``privlm audit`` has run."""
    path = rd.path / "audit.json"
    if not path.exists():
        return ""
    a = json.loads(path.read_text(encoding="utf-8"))
    rows, img = [], ""
    c = a.get("canaries")
    if c:
        e, o = c["exposure"], c["one_run"]
        rows += [("canaries (included)", f"{c['count']} ({c['included']})"),
                 ("mean exposure, included / excluded (bits)", f"{e['included_mean']:.2f} / {e['excluded_mean']:.2f}"),
                 ("extrapolated exposure, included / excluded", f"{e['included_mean_extrapolated']:.2f} / "
                                                               f"{e['excluded_mean_extrapolated']:.2f}"),
                 ("one-run audit: correct / guesses", f"{o['correct']} / {o['guesses']}"),
                 ("epsilon lower bound (95%)", f"{o['epsilon_lower_bound']:.3f}"),
                 ("claimed epsilon", str(a.get("claimed_epsilon")))]
        fig, ax = plt.subplots(figsize=(6, 3))
        for inc, color in ((True, "tab:red"), (False, "tab:blue")):
            xs = [r["exposure"] for r in c["per_canary"] if r["included"] == inc]
            ax.hist(xs, bins=20, alpha=0.6, color=color, label="included" if inc else "excluded")
        ax.set_xlabel("exposure (bits)"), ax.set_ylabel("canaries"), ax.legend()
        img = f'<img alt="exposure" src="data:image/png;base64,{_png(fig)}">'
    u = a.get("update_canaries")
    if u:
        o = u["one_run"]
        rows += [("update canaries, white-box (included)", f"{u['count']} ({u['included']})"),
                 ("update canaries: correct / guesses, epsilon lower bound",
                  f"{o['correct']} / {o['guesses']}, {o['epsilon_lower_bound']:.3f}")]
    m = a.get("membership")
    if m and m.get("auc") is not None:
        rows += [("membership inference AUC", f"{m['auc']:.3f}"), ("TPR at 1% FPR", f"{m['tpr_at_1pct_fpr']:.3f}")]
    p = a.get("pii")
    if p:
        rows += [("PII in generations (verbatim in training text)",
                  f"{p['pii_found']} in {p['generations']} samples ({p['verbatim_in_training_text']})")]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    verdict = ("<p style='color:#b00'><b>The audit's lower bound exceeds the claimed epsilon: the implementation "
               "is broken.</b></p>" if a.get("broken") else "")
    return f"<h2>Privacy audit</h2>{verdict}<table>{table}</table>{img}"


def attack_section(rd: RunDir) -> str:
    """A simulated poisoning attack's log (``attack.json``, written by privlm.attacks), if any."""
    path = rd.path / "attack.json"
    if not path.is_file():
        return ""
    try:
        return _attack_html(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return "<h2>Simulated attack</h2><p>attack.json is unreadable.</p>"


def _attack_html(a: dict) -> str:
    evals = [e for e in a.get("evaluations", []) if isinstance(e, dict)]
    rows = [("attack", str(a.get("kind"))),
            ("malicious clients", f"{a.get('malicious_clients')} ({100 * float(a.get('fraction') or 0):g}% of the population)"),
            ("malicious updates sent", str(a.get("malicious_updates_sent"))),
            ("rounds with an attacker", str(a.get("rounds_with_attackers")))]
    backdoor = a.get("kind") == "backdoor"
    if backdoor:
        rows += [("trigger -> target", f"{a.get('trigger')!r} -> {a.get('target')!r}"),
                 ("boost", fmt(a.get("boost")))]
    else:
        rows.append(("scale", fmt(a.get("scale"))))
    head = "<tr><th>round</th><th>accuracy</th>" + ("<th>backdoor success</th>" if backdoor else "") + "</tr>"
    body = "".join(
        f"<tr><td>{html.escape(str(e.get('round')))}</td><td>{html.escape(fmt(e.get('eval_accuracy')))}</td>"
        + (f"<td>{100 * float(e['backdoor_success']):.1f}% of {html.escape(str(e.get('prompts')))}</td>"
           if isinstance(e.get("backdoor_success"), (int, float)) else "<td>—</td>" if backdoor else "")
        + "</tr>" for e in evals)
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return ("<h2>Simulated attack</h2><p>A poisoning attack was simulated in this run (privlm's [attack] section): "
            "the model is for measuring defences, not for deployment.</p>"
            f"<table>{table}</table><div class='scroll'><table class='metrics'>{head}{body}</table></div>")


_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def fmt(value: object) -> str:
    """A number as a person reads it: 4 significant digits, small ones as 8.53 x 10^-5."""
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            mantissa, exponent = f"{value:.3g}".split("e") if "e" in f"{value:.3g}" else (f"{value:.3g}", "0")
            return f"{mantissa} \u00d7 10{str(int(exponent)).translate(_SUPERSCRIPT)}"
        return f"{value:.4g}"
    return str(value)


def mechanism_label(privacy: dict) -> str:
    mode = privacy.get("mode")
    if mode == "none":
        return "none (plain FedAvg): no guarantee"
    if mode == "example":
        return "example-level DP-SGD in each silo (Opacus)"
    mf = privacy.get("matrix_factorization")
    if mf:
        return f"user-level banded matrix factorization ({mf['bands']} bands, sampling {mf['sampling']})"
    return "user-level DP-FedAvg" + (", adaptive clipping" if privacy.get("adaptive_clipping") else "")


def _summary(privacy: dict, rows: list[dict]) -> list[tuple[str, str]]:
    last = next((r for r in reversed(rows) if r.get("eval_accuracy") is not None), {})
    seconds = sum(r.get("seconds") or 0.0 for r in rows)
    out = [("rounds completed", fmt(privacy.get("rounds_completed"))), ("mechanism", mechanism_label(privacy))]
    if privacy.get("mode") != "none":
        eps = privacy.get("epsilon")
        out += [("epsilon, delta", f"{fmt(eps) if eps is not None else 'pending'}, {fmt(privacy.get('delta'))}"),
                ("unit of privacy", fmt(privacy.get("unit"))), ("accountant", fmt(privacy.get("accountant")))]
        if privacy.get("mode") == "user":
            out += [("noise multiplier z, clip norm C",
                     f"{fmt(privacy.get('noise_multiplier'))}, {fmt(privacy.get('clip_norm'))}"),
                    ("sampling rate q", fmt(privacy.get("sampling_rate")))]
        out.append(("secure noise", fmt(privacy.get("secure_noise"))))
    out += [("population", str(privacy.get("population") or f"{fmt(privacy.get('num_clients'))} clients")),
            ("clients per round", fmt(privacy.get("clients_per_round"))),
            (f"held-out accuracy, loss (round {last.get('round', '-')})",
             f"{fmt(last.get('eval_accuracy'))}, {fmt(last.get('eval_loss'))}"),
            ("wall time of the rounds", f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s")]
    if privacy.get("stopped"):
        out.append(("stopped", str(privacy["stopped"])))
    return out


def _gauge(privacy: dict) -> str:
    eps, budget = privacy.get("epsilon"), privacy.get("budget_epsilon")
    if eps is None or not budget:
        return ""
    share = max(0.0, min(1.0, eps / budget))
    color = "#3a3" if share < 0.8 else "#d90" if share < 1.0 else "#b00"
    return (f'<div class="gauge" title="epsilon spent of the budget"><div style="width:{100 * share:.1f}%;'
            f'background:{color}"></div></div><p>Budget: epsilon {fmt(eps)} of {fmt(budget)} spent '
            f"({100 * eps / budget:.0f}%).</p>")


METRIC_COLUMNS = ("round", "clients", "sampled", "rejected", "dropped", "clipped", "clip_norm", "train_loss",
                  "eval_loss", "eval_accuracy", "epsilon", "seconds")


def _metrics_table(rows: list[dict]) -> str:
    cols = [c for c in METRIC_COLUMNS if any(r.get(c) is not None for r in rows)]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f'<div class="scroll"><table class="metrics"><tr>{head}</tr>{body}</table></div>'


def _samples(rd: RunDir) -> str:
    """Generations from the latest checkpoint: covered by the guarantee (computed from it alone)."""
    try:
        import torch

        from privlm.inference import load_run_model

        r, model, tok, cfg = load_run_model(rd.path)
        prompts = cfg.report.prompts  # type: ignore[attr-defined]
        if not prompts:
            return ""
        g = torch.Generator().manual_seed(cfg.seed)  # type: ignore[attr-defined]
        items = []
        with torch.no_grad():
            for prompt in prompts:
                ids = tok.encode(prompt).unsqueeze(0)
                out = model.generate(ids, cfg.report.max_new_tokens,  # type: ignore[attr-defined,operator]
                                     temperature=cfg.report.temperature, generator=g)  # type: ignore[attr-defined]
                text = tok.decode(out[0, ids.size(1):])
                items.append(f"<li><b>{html.escape(prompt)}</b>{html.escape(text)}</li>")
    except Exception as e:  # (a report must never fail a run that has finished)
        log.warning("report.html: no sample generations (%s)", e)
        return f"<h2>Samples</h2><p>No samples: {html.escape(str(e))}</p>"
    return (f"<h2>Samples from the round-{r} checkpoint</h2><p>Public prompts (<code>[report] prompts</code>), "
            f"{cfg.report.max_new_tokens} new tokens at temperature {cfg.report.temperature:g}; "  # type: ignore[attr-defined]
            f'computed from the checkpoint alone, so covered by the guarantee.</p><ul class="samples">{"".join(items)}</ul>')


def write_report(rd: RunDir) -> None:
    rows = rd.read_metrics()
    privacy = rd.read_privacy()
    imgs = plots(rows)
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _summary(privacy, rows))
    scrub = rd.read_scrub()
    scrub_html = ""
    if scrub is not None:
        cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{v:,}</td></tr>" for k, v in scrub["counts"].items())
        scrub_html = (f"<h2>PII scrubbing</h2><p>Before training, each of {scrub['clients']:,} clients replaced "
                      f"these values in its own text ({html.escape(scrub['detector'])}, operator "
                      f"{html.escape(scrub['operator'])}); only the counts left the clients.</p>"
                      f"<table>{cells or '<tr><td>none found</td></tr>'}</table>")
    img_tags = "".join(f'<img alt="{k}" src="data:image/png;base64,{v}">' for k, v in imgs.items())
    guarantee = privacy.get("guarantee", "")
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>privlm run report</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;overflow-wrap:anywhere}}
th{{text-align:left;padding-right:1em;vertical-align:top}} td{{vertical-align:top}}
.g{{background:#eef6ee;padding:1em;border-left:4px solid #3a3}} img{{max-width:100%;height:auto}}
.gauge{{width:100%;max-width:500px;height:14px;background:#eee;border-radius:7px;overflow:hidden}}
.gauge div{{height:100%}} .scroll{{max-height:24em;overflow:auto;border:1px solid #ddd}}
table.metrics{{border-collapse:collapse;font-size:0.85em;white-space:nowrap}}
table.metrics th,table.metrics td{{padding:2px 8px;border-bottom:1px solid #eee;text-align:right}}
table.metrics th{{position:sticky;top:0;background:#fafafa}} ul.samples li{{white-space:pre-wrap;margin:.5em 0}}</style>
</head><body>
<h1>privlm run report</h1>
<table>{table}</table>
<h2>Guarantee</h2>
<p class="g">{html.escape(guarantee)}</p>
{_gauge(privacy)}
<p>Epsilon is recomputed from the ledger in <code>privacy.json</code> ({len(privacy.get("ledger", []))} events)
with dp-accounting; <code>privlm epsilon --ledger privacy.json</code> reproduces it.</p>
<h2>Curves</h2>
{img_tags}
{_samples(rd)}
{scrub_html}
{audit_section(rd)}
{attack_section(rd)}
<h2>Per-round metrics</h2>
<p>Not covered by the guarantee (computed from clients' updates without noise): keep with the operator.</p>
{_metrics_table(rows)}
</body></html>
"""
    atomic_write(rd.report_path, page.encode())

"""``report.html``: loss/accuracy and epsilon curves (embedded PNGs) and the guarantee in words."""

from __future__ import annotations

import base64
import html
import io
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from privlm.rundir import RunDir, atomic_write  # noqa: E402


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


def write_report(rd: RunDir) -> None:
    rows = rd.read_metrics()
    privacy = rd.read_privacy()
    imgs = plots(rows)
    last = next((r for r in reversed(rows) if r.get("eval_accuracy") is not None), {})
    summary = {k: privacy.get(k) for k in (
        "mode", "unit", "epsilon", "delta", "accountant", "noise_multiplier", "clip_norm",
        "sampling_rate", "num_clients", "clients_per_round", "rounds_completed", "rounds_spent",
        "budget_epsilon", "secure_noise", "stopped")}
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in summary.items())
    scrub = rd.read_scrub()
    scrub_html = ""
    if scrub is not None:
        cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{v:,}</td></tr>" for k, v in scrub["counts"].items())
        scrub_html = (f"<h2>PII scrubbing</h2><p>Before training, each of {scrub['clients']:,} clients replaced "
                      f"these values in its own text ({html.escape(scrub['detector'])}, operator "
                      f"{html.escape(scrub['operator'])}); only the counts left the clients.</p>"
                      f"<table>{cells or '<tr><td>none found</td></tr>'}</table>")
    img_tags = "".join(f'<img alt="{k}" src="data:image/png;base64,{v}">' for k, v in imgs.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>privlm run report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} th{{text-align:left;padding-right:1em}}
.g{{background:#eef6ee;padding:1em;border-left:4px solid #3a3}} img{{max-width:100%}}</style></head><body>
<h1>privlm run report</h1>
<p class="g">{html.escape(privacy.get("guarantee", ""))}</p>
<p>Final held-out loss {last.get("eval_loss")}, next-token accuracy {last.get("eval_accuracy")}
after round {last.get("round")}.</p>
{img_tags}
<h2>Privacy</h2><table>{table}</table>
<p>Epsilon is recomputed from the ledger in <code>privacy.json</code> ({len(privacy.get("ledger", []))} events)
with dp-accounting; <code>privlm epsilon --ledger privacy.json</code> reproduces it.</p>
{scrub_html}
{audit_section(rd)}
<h2>Metrics</h2><pre>{html.escape(chr(10).join(json.dumps(r) for r in rows[-20:]))}</pre>
</body></html>
"""
    atomic_write(rd.report_path, page.encode())

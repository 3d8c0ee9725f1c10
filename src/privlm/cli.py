"""The ``privlm`` command line (typer + rich)."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from privlm.errors import PrivlmError


class _Group(TyperGroup):
    """The CLI's one error handler: every command and subcommand runs inside :meth:`invoke`.

    A :class:`PrivlmError` (bad config, bad data, an impossible budget, a federation
    failure) becomes one line on stderr and exit code 2; ``--debug`` re-raises it for the
    traceback. It lives on the click group, so it holds both for the ``privlm`` command
    (:func:`entry`) and for ``app`` called directly (``typer.testing.CliRunner``).
    Commands just raise; none catches ``PrivlmError`` itself.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PrivlmError as e:
            if _state["debug"]:
                raise
            err.print(f"[bold red]error:[/] {escape(_one_line(str(e)))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Federated language-model training with differential privacy.")
data_app = typer.Typer(cls=_Group, no_args_is_help=True, help="Public data sets for examples and benchmarks.")
app.add_typer(data_app, name="data")
console = Console()
err = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
         verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _one_line(text: str, limit: int = 2000) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def entry() -> None:
    """The ``privlm`` command: the typer app, with every unexpected error as one line.

    A traceback (let alone one with local variables, which can hold clients' text)
    never reaches the terminal unless ``--debug`` asks for one, and then without
    locals. An OS error names its file; anything else names the exception and where
    it happened, never its message (which could quote data).
    """
    import traceback

    try:
        app(prog_name="privlm")
    except SystemExit:
        raise
    except KeyboardInterrupt:
        err.print("error: interrupted", highlight=False)
        sys.exit(130)
    except BaseException as e:  # noqa: BLE001 - the last line of defence
        if _state["debug"]:
            traceback.print_exception(type(e), e, e.__traceback__)  # plain: no locals
            sys.exit(2)
        err.print(f"[bold red]error:[/] {escape(_describe(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and (e.filename or e.strerror):
        where = f"{e.filename}: " if e.filename else ""
        return _one_line(f"{where}{e.strerror or type(e).__name__}" + (
            " (free some space; files already written are intact, and privlm run --resume continues)"
            if e.errno in (28, 30) else ""))
    if isinstance(e, MemoryError):
        return "out of memory: an input asks for more than this machine has (rerun with --debug for where)"
    if isinstance(e, RecursionError):
        return "an input is nested too deeply to read"
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" in {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb is not None else ""
    return (f"unexpected {type(e).__name__}{where} (a privlm bug, or an input it does not check: "
            "rerun with --debug for the traceback; it is not shown here as it may quote data)")


@app.command()
def run(
    config: Annotated[Optional[Path], typer.Argument(help="TOML config (default: the embedded default).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key: section.key=value.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default ./runs/<time>).")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", help="Continue the run in this directory from its last durable state.")] = None,
) -> None:
    """Train a language model federatedly and write a run directory."""
    from privlm.config import load_config

    if resume is not None:
        from privlm.rundir import open_run_dir

        if config is not None or set_ or out is not None:
            raise PrivlmError("--resume: give no CONFIG, --set or --out; a resumed run uses "
                              "its own config.toml and directory")
        out = resume
        cfg = load_config(open_run_dir(resume).config_path, [])
    else:
        cfg = load_config(config, set_ or [])
    if cfg.runtime == "flower-simulation":
        if resume is not None:
            raise PrivlmError('--resume: runs of runtime = "flower-simulation" cannot be resumed yet')
        from privlm.runtime.flower.ray_simulation import run_flower_simulation

        console.print("runtime: Flower simulation engine (Ray), one virtual SuperNode per client")
        _print_result(run_flower_simulation(cfg, out, progress=not no_progress))
        return
    if resume is None and (target := out or cfg.output.dir) is not None:
        from privlm.rundir import RunDir

        RunDir(Path(target)).check_new()  # a taken --out fails now, not after the corpus is built
    from privlm.api import Simulation  # (torch: after the config and --out are checked)
    from privlm.audit import load_plan

    sim = Simulation(cfg, progress=not no_progress, audit_plan=load_plan(resume) if resume is not None else None)
    st = sim.corpus.stats()
    p = sim.cfg.privacy
    console.print(f"data: {st['name']}: {st['num_clients']} clients, "
                  f"{st['train_chars']:,} training / {st['test_chars']:,} held-out characters")
    if sim.scrub_counts is not None:
        found = ", ".join(f"{k} {v:,}" for k, v in sim.scrub_counts.items()) or "nothing found"
        console.print(f"scrubbed PII on each client ({cfg.data.scrub.operator}): {found}")
    if p.mode == "example":
        console.print(f"privacy: example-level DP-SGD (Opacus) in each of {len(sim.silos)} silos, "
                      f"C={p.clip_norm}, delta={p.delta:.3g}, budget epsilon={p.budget}")
    elif p.mode == "user":
        mf = p.mechanism if p.mechanism is not None and p.mechanism.kind == "banded-mf" else None
        kind = (f"banded MF ({mf.bands} bands, sampling {mf.sampling}" + (f", group q={sim.algo.sampling_rate:.4g})"
                if mf.sampling == "cyclic-poisson" else ")")) if mf is not None else \
            f"DP-FedAvg, q={sim.algo.sampling_rate:.4g}"
        console.print(f"privacy: user-level {kind}, z={p.noise_multiplier:.4g}, C={p.clip_norm}, "
                      f"delta={p.delta:.3g}, budget epsilon={p.budget}")
    else:
        console.print("[yellow]privacy: none (plain FedAvg): no guarantee[/]")
    if resume is not None:
        console.print(f"resuming {resume}")
    res = sim.run(out, progress=not no_progress, resume=resume is not None)
    if res.stopped:
        console.print(f"[yellow]{res.stopped}[/]")
    console.print(f"run directory: [bold]{res.run_dir}[/]")
    console.print(f"rounds: {res.rounds_completed}  held-out loss: {res.eval_loss:.4f}  "
                  f"next-token accuracy: {res.eval_accuracy:.4f}")
    if res.epsilon is not None and p.mode == "example":
        console.print(f"[bold green]guarantee: example-level in each silo (epsilon <= {res.epsilon:.3f} "
                      f"for every silo, delta={res.delta:.3g}; per silo in privacy.json)[/]")
    elif res.epsilon is not None:
        console.print(f"[bold green]guarantee: user-level (epsilon={res.epsilon:.3f}, delta={res.delta:.3g})[/]")
    else:
        console.print("[yellow]guarantee: none (non-private run)[/]")


@app.command()
def epsilon(
    sampling_rate: Annotated[Optional[float], typer.Option(help="Poisson sampling rate q.")] = None,
    noise_multiplier: Annotated[Optional[float], typer.Option(help="Noise multiplier z.")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="Number of rounds T.")] = None,
    delta: Annotated[Optional[float], typer.Option(help="Target delta.")] = None,
    accountant: Annotated[str, typer.Option(help="pld or rdp.")] = "pld",
    ledger: Annotated[Optional[Path], typer.Option(help="Recompute from a run's privacy.json instead.")] = None,
) -> None:
    """Print epsilon for T rounds of DP-FedAvg at (q, z), or of a run's ledger."""
    from privlm.privacy import accountant as acc

    if accountant not in ("pld", "rdp"):
        raise PrivlmError(f"--accountant: {accountant!r} is not 'pld' or 'rdp'")
    if ledger is not None:
        eps, d, per_silo = _ledger_epsilon(ledger, delta, accountant)
        for silo, e in per_silo.items():  # example-level ledgers: one line per silo, then the max
            console.print(f"{silo}\t{e:.6g}", highlight=False)
        console.print(f"{eps:.6g}" if math.isfinite(eps) else "inf", highlight=False)
        return
    for name, v in (("--sampling-rate", sampling_rate), ("--noise-multiplier", noise_multiplier),
                    ("--rounds", rounds), ("--delta", delta)):
        if v is None:
            raise PrivlmError(f"{name} is required (or give --ledger)")
    _check_range("--sampling-rate", sampling_rate, 0, 1, inclusive_hi=True)
    _check_range("--delta", delta, 0, 1)
    if (problem := acc.accounting_problem(sampling_rate, noise_multiplier, rounds)) is not None:
        raise PrivlmError(f"--{problem[0].replace('_', '-')}: {problem[1]}")
    eps = acc.epsilon(sampling_rate, noise_multiplier, rounds, delta, accountant)  # type: ignore[arg-type]
    console.print(f"{eps:.6g}", highlight=False)


def _ledger_epsilon(path: Path, delta: float | None, kind: str) -> tuple[float, float, dict[str, float]]:
    from privlm.privacy.accountant import ledger_epsilon
    from privlm.privacy.ledger import Ledger
    from privlm.rundir import read_json

    rec = read_json(path / "privacy.json" if path.is_dir() else path)
    if not isinstance(rec, dict):
        raise PrivlmError(f"{path}: not a privacy.json record (a JSON object)")
    mode = rec.get("mode")
    try:
        led = Ledger.from_list(rec.get("ledger"), mode=mode if mode in ("user", "example", "none") else "user")
    except ValueError as e:
        raise PrivlmError(f"{path}: bad ledger: {e}") from None
    d = delta if delta is not None else rec.get("delta")
    if d is None:
        raise PrivlmError(f"{path}: no delta recorded; pass --delta")
    eps, per = ledger_epsilon(led, d, kind)  # type: ignore[arg-type]
    return eps, d, per


def _check_range(name: str, v: float, lo: float, hi: float, inclusive_hi: bool = False) -> None:
    if not (lo < v < hi or (inclusive_hi and v == hi)):  # (NaN fails both)
        raise PrivlmError(f"{name}: {v} is outside ({lo}, {hi}{']' if inclusive_hi else ')'}")


@app.command()
def calibrate(
    target_epsilon: Annotated[float, typer.Option(help="Epsilon to meet.")],
    sampling_rate: Annotated[float, typer.Option(help="Poisson sampling rate q.")],
    rounds: Annotated[int, typer.Option(help="Number of rounds T.")],
    delta: Annotated[float, typer.Option(help="Target delta.")],
    accountant: Annotated[str, typer.Option(help="pld or rdp.")] = "pld",
) -> None:
    """Print the smallest noise multiplier whose T rounds meet the target epsilon."""
    from privlm.privacy.accountant import accounting_problem, calibrate_noise_multiplier

    if accountant not in ("pld", "rdp"):
        raise PrivlmError(f"--accountant: {accountant!r} is not 'pld' or 'rdp'")
    _check_range("--sampling-rate", sampling_rate, 0, 1, inclusive_hi=True)
    _check_range("--delta", delta, 0, 1)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivlmError(f"--target-epsilon: {target_epsilon} is not a finite number > 0")
    if (problem := accounting_problem(sampling_rate, 1.0, rounds)) is not None or rounds <= 0:
        raise PrivlmError(f"--rounds: {problem[1] if problem else f'{rounds} is not > 0'}")
    try:
        z = calibrate_noise_multiplier(target_epsilon, sampling_rate, rounds, delta, accountant)  # type: ignore[arg-type]
    except ValueError as e:
        raise PrivlmError(f"--target-epsilon: {target_epsilon:g} cannot be met: {e}") from None
    console.print(f"{z:.6g}", highlight=False)


@app.command("eval")
def eval_(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
    """Held-out loss and next-token accuracy of a run's latest checkpoint, on all clients."""
    from privlm.inference import evaluate_run

    r, loss, acc, n = evaluate_run(run_dir)
    console.print(f"round {r}: held-out loss {loss:.4f}, next-token accuracy {acc:.4f} ({n:,} tokens)")


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to sample.")] = 200,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.8,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed.")] = None,
) -> None:
    """Sample a continuation of PROMPT from a run's latest checkpoint."""
    from privlm.inference import generate_text

    if seed is not None and not 0 <= seed < 2**63:
        raise PrivlmError(f"--seed: {seed} is outside [0, 2^63)")
    if not (math.isfinite(temperature) and 0 < temperature <= 100):
        raise PrivlmError(f"--temperature: {temperature} is not a number in (0, 100]")
    if not 0 <= max_new_tokens <= 1_000_000:
        raise PrivlmError(f"--max-new-tokens: {max_new_tokens} is outside [0, 1,000,000]")
    text = generate_text(run_dir, prompt, max_new_tokens, temperature, seed)
    sys.stdout.write(text + "\n")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    out: Annotated[Path, typer.Argument(help="A new directory for the transformers model and its card.")],
    adapter: Annotated[bool, typer.Option("--adapter", help="LoRA runs: the peft adapter alone, its base named "
                                          "(default: the base with the adapter merged).")] = False,
    include_metrics: Annotated[bool, typer.Option(
        "--include-metrics", help="Put the held-out loss and accuracy in the card (not covered by the guarantee: "
        "computed from clients' data without noise).")] = False,
    include_audit: Annotated[bool, typer.Option(
        "--include-audit", help="Put privlm audit's figures in the card (not covered by the guarantee: computed "
        "from clients' data and canaries).")] = False,
) -> None:
    """Export a run's latest checkpoint for transformers, with a model card stating its guarantee."""
    from privlm.export import export_run

    res = export_run(run_dir, out, adapter_only=adapter, include_metrics=include_metrics,
                     include_audit=include_audit)
    what = {"gpt2": "GPT-2 (transformers) with privlm's weights", "merged": "base model with the LoRA adapter merged",
            "adapter": "peft LoRA adapter"}[res["kind"]]
    check = ("no logit check (an adapter alone computes nothing)" if res["max_logit_error"] is None else
             f"logits match privlm's to {res['max_logit_error']:.1g} (relative)")
    console.print(f"exported the round-{res['round']} checkpoint to [bold]{escape(str(out))}[/]: {what}; {check}")
    if res["epsilon"] is not None:
        console.print(f"model card README.md: epsilon={res['epsilon']:.3f}, delta={res['delta']:.3g} "
                      "(recomputed from the ledger)")


@data_app.command("download")
def data_download(
    name: Annotated[str, typer.Argument(help="shakespeare or tinyshakespeare.")],
    to: Annotated[Optional[Path], typer.Option("--to", help="Destination (default: the cache data.path uses).")] = None,
) -> None:
    """Download a public-domain corpus, checking every file's SHA-256."""
    from privlm.data.download import download

    if name not in ("shakespeare", "tinyshakespeare"):
        raise PrivlmError(f"data set {name!r}: choose shakespeare or tinyshakespeare")
    path = download(name, to)  # type: ignore[arg-type]
    console.print(f"{name}: verified files in {path}")


tokenizer_app = typer.Typer(cls=_Group, no_args_is_help=True, help="Tokenizers for from-scratch models.")
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
def tokenizer_train(
    data: Annotated[Path, typer.Option("--data", help="A text file, or a directory of .txt files (public text).")],
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Vocabulary size (>= 257).")],
    out: Annotated[Path, typer.Option("--out", help="Directory for tokenizer.json.")],
) -> None:
    """Train a byte-level BPE tokenizer (tokenizers library); use it with model.tokenizer = DIR.

    Train on public text: a vocabulary learned from private text reveals its
    frequent strings and is not covered by the DP guarantee.
    """
    from privlm.data._common import read_utf8
    from privlm.models.tokenizer import train_bpe

    if vocab_size < 257:
        raise PrivlmError(f"--vocab-size: {vocab_size} must be at least 257 (256 bytes + merges)")
    files = sorted(data.rglob("*.txt")) if data.is_dir() else [data]
    if not data.exists():
        raise PrivlmError(f"--data: {data}: not found")
    if not files:
        raise PrivlmError(f"--data: {data}: no .txt files")
    path = train_bpe((read_utf8(f) for f in files), vocab_size, out)
    console.print(f"tokenizer ({vocab_size} tokens, from {len(files)} file(s)): [bold]{path}[/]")


def _entities_option(entities: str | None) -> tuple[str, ...] | None:
    if entities is None:
        return None
    from privlm.pii import check_entities

    return tuple(check_entities([e.strip() for e in entities.split(",") if e.strip()], "--entities"))


@app.command()
def scrub(
    src: Annotated[Path, typer.Argument(help="A .txt/.jsonl file, or a directory of them.")],
    dst: Annotated[Path, typer.Argument(help="Output file or directory (never overwritten).")],
    fmt: Annotated[str, typer.Option("--format", help="txt (line by line) or jsonl (the 'text' field).")] = "txt",
    operator: Annotated[str, typer.Option("--operator", help="placeholder (<PERSON>) or pseudonym.")] = "placeholder",
    entities: Annotated[Optional[str], typer.Option("--entities", help="Comma-separated entity types.")] = None,
    spacy_model: Annotated[Optional[str], typer.Option("--spacy-model", help="Installed spaCy model for NER.")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Processes (default: CPU cores).")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
) -> None:
    """Replace PII (Presidio, offline) in text files before they are used for training."""
    from privlm.data.scrub import ScrubSettings, scrub_path
    from privlm.pii import OPERATORS

    if operator not in OPERATORS:
        raise PrivlmError(f"--operator: must be one of {', '.join(OPERATORS)} (got {operator!r})")
    if workers is not None and workers < 1:
        raise PrivlmError(f"--workers: must be at least 1 (got {workers})")
    settings = ScrubSettings(_entities_option(entities), operator, spacy_model)
    counts = scrub_path(src, dst, fmt, settings, progress=not no_progress, workers=workers)
    found = ", ".join(f"{k} {v:,}" for k, v in counts.items()) or "no PII found"
    console.print(f"scrubbed into [bold]{escape(str(dst))}[/]: {found}")


@app.command("scrub-eval")
def scrub_eval(
    gold: Annotated[Path, typer.Argument(help="Presidio-research style JSON: [{full_text, spans: [...]}, ...].")],
    spacy_model: Annotated[Optional[str], typer.Option("--spacy-model", help="Installed spaCy model for NER.")] = None,
    entities: Annotated[Optional[str], typer.Option("--entities", help="Comma-separated entity types.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the scores here.")] = None,
) -> None:
    """Span-level recall and precision of the PII detector per entity type on a gold file."""
    import json

    from rich.table import Table

    from privlm.pii import Detector, evaluate, read_gold

    docs = read_gold(gold)
    detector = Detector(_entities_option(entities), spacy_model)
    report = evaluate(detector, docs)
    table = Table(title=f"PII detection on {gold.name} ({len(docs):,} texts; "
                        f"{'NER ' + spacy_model if spacy_model else 'patterns only'})")
    for col in ("entity type", "gold", "found", "recall", "detected", "precision"):
        table.add_column(col, justify="left" if col == "entity type" else "right")

    def pct(x: float) -> str:
        return "-" if math.isnan(x) else f"{x:.3f}"

    for etype, r in report.items():
        table.add_row(etype, str(r["gold"]), str(r["found"]), pct(r["recall"]), str(r["detected"]),
                      pct(r["precision"]))
    console.print(table)
    console.print("recall: a gold span counts only if all its letters and digits are covered by detections "
                  "of its type; precision: detections that overlap a gold span of their type.")
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")


@app.command()
def audit(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    references: Annotated[int, typer.Option("--references", help="Random reference secrets for exposure.")] = 2000,
    generations: Annotated[int, typer.Option("--generations", help="Samples for the PII-leakage attack (0: skip).")] = 50,
    guesses: Annotated[Optional[int], typer.Option("--guesses", help="One-run audit: canaries guessed (default M/5).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed the audit's own randomness.")] = None,
) -> None:
    """Try to break the run's guarantee: canary exposure, one-run ε lower bound, membership
    inference, PII in generations. Writes audit.json and the report's audit section; exits 1 if
    the measured lower bound on ε exceeds the claimed ε (an implementation bug)."""
    from privlm.audit import run_audit

    if references < 2:
        raise PrivlmError(f"--references: must be at least 2 (got {references})")
    if generations < 0:
        raise PrivlmError(f"--generations: must be >= 0 (got {generations})")
    if guesses is not None and guesses < 1:
        raise PrivlmError(f"--guesses: must be at least 1 (got {guesses})")
    res = run_audit(run_dir, references, generations, guesses, seed=seed)
    claimed = res["claimed_epsilon"]
    c = res["canaries"]
    u = res["update_canaries"]
    if c is None and u is None:
        console.print("canaries: none planted (set audit.canaries / audit.update_canaries before training)")
    if u is not None:
        o = u["one_run"]
        console.print(f"update canaries (white-box): {u['count']} ({u['included']} included); "
                      f"{o['correct']}/{o['guesses']} correct guesses -> epsilon lower bound "
                      f"{o['epsilon_lower_bound']:.3f} at {o['confidence']:.0%} (claimed {claimed})")
    if c is not None:
        e, o = c["exposure"], c["one_run"]
        console.print(f"canaries: {c['count']} ({c['included']} included); mean exposure included "
                      f"{e['included_mean']:.2f} bits vs excluded {e['excluded_mean']:.2f} "
                      f"(extrapolated {e['included_mean_extrapolated']:.2f} vs {e['excluded_mean_extrapolated']:.2f}; "
                      f"space {c['space_bits']:.1f} bits)")
        console.print(f"one-run audit: {o['correct']}/{o['guesses']} correct guesses -> epsilon lower bound "
                      f"{o['epsilon_lower_bound']:.3f} at {o['confidence']:.0%} (claimed {claimed})")
    mia = res["membership"]
    if mia and mia["auc"] is not None:
        console.print(f"membership inference ({mia['members']} training vs {mia['nonmembers']} held-out clients): "
                      f"AUC {mia['auc']:.3f}, TPR at 1% FPR {mia['tpr_at_1pct_fpr']:.3f}")
    pii = res["pii"]
    if pii:
        console.print(f"PII in {pii['generations']} generations: {pii['pii_found']} found, "
                      f"{pii['verbatim_in_training_text']} verbatim in the training text, "
                      f"{pii['exact_continuation']} exactly the value that followed the prompt")
    console.print(f"written: {escape(str(Path(run_dir) / 'audit.json'))} and report.html")
    if res["broken"]:
        err.print(f"[bold red]AUDIT FAILED: the measured lower bound on epsilon "
                  f"({res['epsilon_lower_bound']:.3f}) exceeds the claimed epsilon ({claimed}). "
                  "The implementation does not deliver its guarantee; this is a bug.[/]")
        raise typer.Exit(1)


def _print_result(run_dir: Path) -> None:
    """The closing lines of ``privlm run``, read back from a finished run directory."""
    from privlm.api import result_from_run_dir

    res = result_from_run_dir(run_dir)
    if res.stopped:
        console.print(f"[yellow]{escape(res.stopped)}[/]")
    console.print(f"run directory: [bold]{escape(str(run_dir))}[/]")
    if not math.isnan(res.eval_loss):
        console.print(f"rounds: {res.rounds_completed}  held-out loss: {res.eval_loss:.4f}  "
                      f"next-token accuracy: {res.eval_accuracy:.4f}")
    dropped = sum(r.get("dropped", 0) for r in res.metrics)
    rejected = sum(r.get("rejected", 0) for r in res.metrics)
    if dropped or rejected:
        console.print(f"[yellow]sampled nodes that contributed nothing: {dropped} dropped, {rejected} rejected "
                      "(the guarantee is unchanged: fixed denominator)[/]")
    if res.epsilon is not None:
        console.print(f"[bold green]guarantee: user-level (epsilon={res.epsilon:.3f}, "
                      f"delta={res.delta:.3g}) over {escape(res.population)}[/]")
        if res.delta > 1e-3:
            console.print(f"[yellow]delta={res.delta:.3g} is large: with {res.corpus_stats['num_clients']} "
                          "clients, protecting one whole client means little; use many more clients, or "
                          "example-level DP inside each silo[/]")
    else:
        console.print("[yellow]guarantee: none (non-private run)[/]")


@app.command("deploy-local")
def deploy_local(
    config: Annotated[Optional[Path], typer.Argument(help="TOML config (default: the embedded default).")] = None,
    clients: Annotated[int, typer.Option("--clients", help="SuperNodes to start; each is one client.")] = 3,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key: section.key=value.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default ./runs/<time>).")] = None,
    tls: Annotated[bool, typer.Option("--tls", help="TLS with a throwaway CA made in the run directory.")] = False,
    certificates: Annotated[Optional[Path], typer.Option(
        "--certificates", help="TLS from a directory with ca.crt, server.pem, server.key (privlm certs).")] = None,
    node_auth: Annotated[bool, typer.Option(
        "--node-auth", help="Admit only SuperNodes whose keys are registered (needs TLS).")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
) -> None:
    """Run on a real Flower federation on 127.0.0.1: a SuperLink and N SuperNodes, all stopped at the end.

    The data set is split into N partitions (as data.silos=N would), one per SuperNode, given to
    each through its node config; the run directory is the same as privlm run's.
    """
    from privlm.config import load_config
    from privlm.runtime.flower.deploy import deploy_local as _deploy

    try:
        cfg = load_config(config, set_ or [])
        console.print(f"starting a Flower SuperLink and {clients} SuperNodes on 127.0.0.1"
                      + (" with TLS" if tls or certificates else ""))
        run_dir = _deploy(cfg, clients, out, certificates, tls, node_auth, progress=not no_progress)
        _print_result(run_dir)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted: every Flower process was stopped; the run directory keeps what "
                  "was written (its ledger counts every round that started)[/]")
        raise typer.Exit(130) from None


@app.command()
def certs(
    directory: Annotated[Path, typer.Argument(help="Where to write ca.crt, ca.key, server.pem, server.key.")],
    host: Annotated[Optional[list[str]], typer.Option(
        "--host", help="Name or address the SuperLink is reached at (repeat; default 127.0.0.1, localhost).")] = None,
    days: Annotated[int, typer.Option("--days", help="Validity in days.")] = 365,
) -> None:
    """Make a private CA and a SuperLink TLS certificate (nodes get only ca.crt)."""
    from privlm.runtime.flower.certs import make_certificates

    if directory.exists() and any(directory.iterdir()):
        raise PrivlmError(f"{directory}: not empty; refusing to overwrite certificates")
    make_certificates(directory, host or ["127.0.0.1", "localhost"], days)
    console.print(f"wrote {escape(str(directory))}/ca.crt, ca.key (keep secret), server.pem, server.key (keep secret)")


@app.command("flower-app")
def flower_app(
    directory: Annotated[Path, typer.Argument(help="Where to write the Flower App (its pyproject.toml).")],
) -> None:
    """Write the Flower App directory that `flwr run` submits (it names privlm's ServerApp and ClientApp)."""
    from privlm.runtime.flower.deploy import write_app

    if (directory / "pyproject.toml").exists():
        raise PrivlmError(f"{directory / 'pyproject.toml'}: exists; refusing to overwrite")
    write_app(directory)
    console.print(f"wrote {escape(str(directory / 'pyproject.toml'))}")


@app.command("node-key")
def node_key(
    path: Annotated[Path, typer.Argument(help="Private key file to write; the public key goes to PATH.pub.")],
) -> None:
    """Make a SuperNode authentication key pair; the operator registers PATH.pub (flwr supernode register)."""
    from privlm.runtime.flower.certs import make_node_key

    if path.suffix == ".pub":
        raise PrivlmError(f"{path}: names the public key; give the private key's path (PATH.pub is written "
                          "beside it)")
    if path.exists() or path.with_suffix(".pub").exists():
        raise PrivlmError(f"{path}: exists; refusing to overwrite a key")
    make_node_key(path)
    console.print(f"wrote {escape(str(path))} (private: keep it on this node) and "
                  f"{escape(str(path.with_suffix('.pub')))} (send it to the federation's operator)")


@app.command()
def sweep(
    config: Annotated[Optional[Path], typer.Argument(help="TOML config (default: the embedded default).")] = None,
    set_grid: Annotated[Optional[list[str]], typer.Option(
        "--set-grid", help="KEY=V1,V2,...: one run per value (repeat for a grid; inf epsilon = non-private).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key for every run.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Directory for the runs, sweep.json/.md/.png.")] = Path("sweep"),
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
) -> None:
    """Run a grid of configs (e.g. target epsilons) and draw accuracy against epsilon."""
    from privlm.sweep import sweep as _sweep

    if not set_grid:
        raise PrivlmError("--set-grid: give at least one KEY=V1,V2,...")

    def show(row: dict) -> None:
        eps = "non-private" if row["epsilon"] is None else f"epsilon {row['epsilon']:.3f}"
        console.print(f"{escape(json.dumps(row['point']))}: {eps}, accuracy {row['eval_accuracy']:.4f}")

    _sweep(config, set_ or [], set_grid, out, progress=not no_progress, on_result=show)
    console.print(f"written: {escape(str(out))}/sweep.json, sweep.md, sweep.png")


if __name__ == "__main__":
    entry()

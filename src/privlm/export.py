"""``privlm export RUN_DIR OUT``: a run's model as a Hugging Face ``transformers`` directory with a
model card that states its guarantee.

* From-scratch GPT runs (``model.kind = "gpt"``) become a ``GPT2LMHeadModel``: privlm's GPT is GPT-2's
  architecture (pre-norm blocks, learned positions, exact GELU, an untied head), so the tensors map
  one to one (GPT-2's ``Conv1D`` stores linear weights transposed). The byte tokenizer becomes a
  byte-level BPE tokenizer without merges whose id of each byte is the byte, so ids are unchanged.
* Hugging Face LoRA runs: the base with the adapter merged into it (``merge_and_unload``), or with
  ``adapter_only`` the peft adapter alone, its base named in ``adapter_config.json``.
* Character-LSTM runs cannot be exported: ``transformers`` has no LSTM causal LM class.

Before anything is written, the converted model's logits are compared with privlm's own on a probe,
and the epsilon in ``privacy.json`` is recomputed from its ledger (which must extend the entries paid
per ``ledger-head.json``): the card states only an epsilon the ledger reproduces. The export is
computed from the latest checkpoint (and a public base model) alone, so the guarantee covers it;
``README.md`` says what it does not cover. Held-out metrics, computed from clients' data without
noise, go into the card only with ``include_metrics``.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch

from privlm.errors import DataError, PrivlmError

# Relative tolerance of the exported model's logits against privlm's (|a - b| <= tol * (1 + |b|)):
# float32 differs only by the order of operations (~1e-6); bfloat16 merges round to 8 bits of mantissa.
LOGIT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
CARD_TAGS = ["privlm", "differential-privacy", "federated-learning", "text-generation"]


def verified_privacy(rd, cfg, checkpoint_round: int) -> dict:
    """privacy.json, refused unless it is consistent with config.toml, its ledger extends the entries
    paid per ledger-head.json and pays for every round up to the exported checkpoint's, and the
    ledger reproduces its epsilon. Returns the record with a pending epsilon filled in from the ledger.

    Read the checkpoint first: a round's entry is durable before its checkpoint is written.
    """
    from privlm.engine.resume import read_paid_ledger
    from privlm.privacy.accountant import ledger_epsilon
    from privlm.privacy.guarantee import WEAK_DELTA

    record = rd.read_privacy()
    if not isinstance(record, dict):
        raise DataError(f"{rd.privacy_path}: not a privacy.json record (a JSON object)")
    p, mode = cfg.privacy, record.get("mode")
    if mode != p.mode:
        raise DataError(f"{rd.privacy_path}: mode {mode!r} does not match config.toml's {p.mode!r}")
    ledger = read_paid_ledger(rd, record, mode)
    if mode == "none":
        return record
    if checkpoint_round > 0 and rd.read_head() is None:
        raise DataError(f"{rd.head_path}: missing, but checkpoint round {checkpoint_round} exists; refusing to "
                        "state an epsilon the paid ledger cannot confirm")
    if mode == "user":  # (example level: a silo-round may cost nothing, so rounds need not all have entries)
        unpaid = next((k for k in range(1, checkpoint_round + 1) if ledger.entry_for(k) is None), None)
        if unpaid is not None:
            raise DataError(f"{rd.privacy_path}: no ledger entry for round {unpaid}, but checkpoint round "
                            f"{checkpoint_round} exists; refusing to under-count")
    delta, accountant = record.get("delta"), record.get("accountant")
    if not isinstance(delta, float) or not 0 < delta < 1 or (p.delta is not None and delta != p.delta):
        raise DataError(f"{rd.privacy_path}: delta {delta!r} is not config.toml's privacy.delta or not in (0, 1)")
    if accountant != p.accountant:
        raise DataError(f"{rd.privacy_path}: accountant {accountant!r} is not config.toml's {p.accountant!r}")
    expected = {"weak": delta > WEAK_DELTA, "secure_noise": not p.seeded_noise,
                "unit": "record" if mode == "example" else "pseudo-user" if cfg.data.pseudo_users else "user"}
    for key, value in expected.items():
        if record.get(key) != value:
            raise DataError(f"{rd.privacy_path}: {key} = {record.get(key)!r}, but config.toml and delta give "
                            f"{value!r}; refusing an edited record")
    eps, _ = ledger_epsilon(ledger, delta, accountant)
    stated = record.get("epsilon")
    if stated is None and record.get("epsilon_pending"):
        return {**record, "epsilon": eps, "epsilon_pending": False}
    if not isinstance(stated, float) or not math.isclose(stated, eps, rel_tol=1e-9, abs_tol=1e-12):
        raise DataError(f"{rd.privacy_path}: epsilon {stated!r} is not what its ledger gives ({eps!r}); "
                        "refusing to export an epsilon the ledger cannot reproduce")
    return record


def _gpt_to_hf(model: torch.nn.Module) -> torch.nn.Module:
    """privlm's GPT as a ``transformers`` GPT2LMHeadModel with the same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.cfg  # type: ignore[attr-defined]
    config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                        n_head=c.n_head, n_inner=4 * c.n_embd, activation_function="gelu",  # exact GELU, as F.gelu
                        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                        layer_norm_epsilon=1e-5, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    hf = GPT2LMHeadModel(config)
    src = model.state_dict()
    out = {"transformer.wte.weight": src["tok_emb.weight"], "transformer.wpe.weight": src["pos_emb.weight"],
           "transformer.ln_f.weight": src["ln_f.weight"], "transformer.ln_f.bias": src["ln_f.bias"],
           "lm_head.weight": src["head.weight"]}
    for i in range(c.n_layer):
        a, b = f"blocks.{i}.", f"transformer.h.{i}."
        for mine, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[b + theirs + ".weight"], out[b + theirs + ".bias"] = src[a + mine + ".weight"], src[a + mine + ".bias"]
        for mine, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                             ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            out[b + theirs + ".weight"] = src[a + mine + ".weight"].t().contiguous()  # Conv1D: (in, out)
            out[b + theirs + ".bias"] = src[a + mine + ".bias"]
    missing, unexpected = hf.load_state_dict(out, strict=False)
    missing = [k for k in missing if not k.endswith(".attn.bias") and not k.endswith(".attn.masked_bias")]
    if missing or unexpected:  # (a transformers version that renamed GPT-2's modules)
        raise PrivlmError(f"export: GPT-2 tensors do not line up (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return hf.eval()


def _byte_tokenizer():
    """A transformers tokenizer whose id of each UTF-8 byte is the byte (privlm's ByteTokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    chars = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _logits(model: torch.nn.Module, ids: torch.Tensor, hf: bool) -> torch.Tensor:
    with torch.no_grad():
        return (model(input_ids=ids).logits if hf else model(ids)).float()


def _check_logits(ours: torch.Tensor, theirs: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    tol = LOGIT_TOLERANCE.get(dtype, 5e-2)
    err = float(((theirs - ours).abs() / (1 + ours.abs())).max())
    if not err <= tol:
        raise PrivlmError(f"export: the {what}'s logits differ from privlm's by {err:.3g} (relative; "
                          f"tolerance {tol:g}); nothing was written")
    return err


def export_run(run_dir: Path, out: Path, adapter_only: bool = False, include_metrics: bool = False,
               include_audit: bool = False) -> dict:
    """Write the export to ``out`` (a new or empty directory); returns a summary dict."""
    from privlm.config import load_config
    from privlm.inference import load_run_model
    from privlm.rundir import open_run_dir

    rd = open_run_dir(run_dir)
    cfg = load_config(rd.config_path)
    if cfg.attack.kind != "none":
        raise PrivlmError(f"export: {rd.config_path} has [attack] kind = {cfg.attack.kind!r}: this model was trained "
                          "with a simulated poisoning attack, to measure defences, and is not for deployment")
    kind = cfg.model.kind
    if kind == "lstm":
        raise PrivlmError('export: model.kind = "lstm" has no transformers equivalent (transformers has no LSTM '
                          f"causal LM class); the weights are in {rd.path / 'checkpoints'} as safetensors, loaded by "
                          "privlm.inference.load_run_model")
    if adapter_only and kind != "hf":
        raise PrivlmError("export --adapter: only Hugging Face LoRA runs (model.kind = \"hf\") have an adapter")
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise PrivlmError(f"{out}: exists and is not an empty directory; choose a new OUT")
    if not out.parent.is_dir():
        raise PrivlmError(f"{out}: its parent directory does not exist")
    if out.resolve().is_relative_to(rd.path.resolve()):
        raise PrivlmError(f"{out}: inside the run directory; choose OUT outside it")
    rd.lock()  # a live run would release newer checkpoints while this one is read: refused
    try:
        r, model, tok, _ = load_run_model(rd.path)  # (before the ledger, which pays for it first)
        privacy = verified_privacy(rd, cfg, r)
        return _write_export(rd, cfg, out, r, model, tok, privacy, adapter_only, include_metrics, include_audit)
    finally:
        rd.unlock()


PROBE = "The patient said: ROMEO, wherefore art thou? 3 May, 14:05. \u00e9 \u2713 "


def _write_export(rd, cfg, out: Path, r: int, model, tok, privacy: dict, adapter_only: bool,
                  include_metrics: bool, include_audit: bool) -> dict:
    block = model.cfg.block_size
    ids = tok.encode(PROBE * (1 + block // 16))[:block].unsqueeze(0)  # a full window of positions
    ours = _logits(model, ids, hf=False)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        base_name, err = None, None
        if cfg.model.kind == "hf":
            peft_model = model.peft
            base_name = str(cfg.model.path)
            if adapter_only:  # (no logit check: the adapter alone computes nothing without its base)
                peft_model.save_pretrained(str(tmp), safe_serialization=True)
                what = "adapter"
            else:
                merged = peft_model.merge_and_unload()
                err = _check_logits(ours, _logits(merged, ids, hf=True), next(merged.parameters()).dtype,
                                    "merged model")
                merged.save_pretrained(str(tmp), safe_serialization=True)
                what = "merged"
            tok.tok.save_pretrained(str(tmp))
        else:
            hf = _gpt_to_hf(model)
            err = _check_logits(ours, _logits(hf, ids, hf=True), torch.float32, "GPT-2 conversion")
            hf.save_pretrained(str(tmp), safe_serialization=True)
            hf_tok = _byte_tokenizer() if cfg.model.tokenizer is None else _bpe_tokenizer(cfg.model.tokenizer)
            hf_tok.model_max_length = block
            hf_tok.save_pretrained(str(tmp))
            what = "gpt2"
        _check_tokenizer(tmp, tok)
        shutil.copyfile(rd.privacy_path, tmp / "privacy.json")
        card = model_card(rd, cfg, privacy, r, what, base_name, include_metrics, include_audit)
        card.save(str(tmp / "README.md"))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "round": r, "kind": what, "epsilon": privacy.get("epsilon"),
            "delta": privacy.get("delta"), "max_logit_error": err}


def _check_tokenizer(directory: Path, tok) -> None:
    """The exported tokenizer gives privlm's ids (ASCII and not)."""
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(str(directory))
    for text in (PROBE, "caf\u00e9 \u2713 \u65e5\u672c \U0001f600\r\n"):
        if exported.encode(text, add_special_tokens=False) != tok.encode(text).tolist():
            raise PrivlmError("export: the exported tokenizer's ids differ from privlm's; nothing was written")


def _bpe_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    file = path / "tokenizer.json" if path.is_dir() else path
    return PreTrainedTokenizerFast(tokenizer_file=str(file))


def _card_privacy(privacy: dict) -> dict:
    """The guarantee as card metadata: privacy.json's own values, unrounded."""
    from privlm.report.html import mechanism_label

    keys = ("epsilon", "delta", "unit", "accountant", "rounds_completed", "rounds_spent", "rounds_lost",
            "num_clients", "population", "clients_per_round", "sampling_rate", "clip_norm", "noise_multiplier",
            "secure_noise", "weak", "covers", "not_covered")
    out = {"mechanism": mechanism_label(privacy), "mode": privacy.get("mode")}
    out.update({k: privacy.get(k) for k in keys if privacy.get(k) is not None})
    return out


def _audit(rd, round_index: int) -> dict | None:
    """The audit's figures (computed from clients' data and canaries: not covered), if it ran."""
    from privlm.engine.resume import check_audit
    from privlm.rundir import read_json

    path = rd.path / "audit.json"
    if not path.exists():
        return None
    check_audit(rd, round_index)  # an audit of a checkpoint this run released
    a = read_json(path)
    out = {"round": a.get("round"), "claimed_epsilon": a.get("claimed_epsilon"),
           "epsilon_lower_bound": a.get("epsilon_lower_bound"), "broken": a.get("broken")}
    m = a.get("membership") or {}
    if m.get("auc") is not None:
        out["membership_auc"] = m["auc"]
    p = a.get("pii") or {}
    if p:
        out["pii_in_generations"] = p.get("pii_found")
    return out


def model_card(rd, cfg, privacy: dict, round_index: int, what: str, base_name: str | None,
               include_metrics: bool, include_audit: bool = False):
    """The Hugging Face model card (``huggingface_hub.ModelCard``): metadata plus a readable guarantee."""
    from huggingface_hub import ModelCard, ModelCardData

    from privlm.report.html import fmt

    meta = _card_privacy(privacy)
    audit = _audit(rd, round_index) if include_audit else None
    extra: dict = {"privacy": meta, "privlm": {"checkpoint_round": round_index, "export": what}}
    if audit is not None:
        extra["privacy_audit"] = audit
    metrics = None
    if include_metrics:
        last = next((m for m in reversed(rd.read_metrics()) if m.get("eval_accuracy") is not None), None)
        if last is not None:
            metrics = {"round": last["round"], "eval_loss": last.get("eval_loss"),
                       "eval_accuracy": last.get("eval_accuracy")}
            extra["held_out_metrics"] = metrics
    hub_base = base_name if base_name and not Path(base_name).expanduser().exists() and "/" in base_name else None
    data = ModelCardData(library_name="peft" if what == "adapter" else "transformers", pipeline_tag="text-generation",
                         tags=CARD_TAGS, base_model=hub_base, **extra)
    private = privacy.get("mode") != "none"
    rows = [("mechanism", meta["mechanism"])]
    if private:
        rows += [("epsilon, delta", f"{fmt(meta.get('epsilon'))}, {fmt(meta.get('delta'))}"),
                 ("unit of privacy", fmt(meta.get("unit"))), ("accountant", fmt(meta.get("accountant")))]
        if privacy.get("mode") == "user":
            rows += [("clip norm C", fmt(meta.get("clip_norm"))), ("noise multiplier z", fmt(meta.get("noise_multiplier"))),
                     ("sampling rate q", fmt(meta.get("sampling_rate")))]
    rows += [("rounds", fmt(meta.get("rounds_completed"))), ("population", str(meta.get("population") or "")),
             ("population size", fmt(meta.get("num_clients"))), ("clients per round", fmt(meta.get("clients_per_round")))]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    weights = {"gpt2": f"privlm's from-scratch GPT (n_layer {cfg.model.n_layer}, n_embd {cfg.model.n_embd}), converted "
                       "to GPT-2 (`GPT2LMHeadModel`) with the same weights",
               "merged": f"the base model `{base_name}` with the run's LoRA adapter merged into it",
               "adapter": f"the run's LoRA adapter for the base model `{base_name}` (load the base, then "
                          "`peft.PeftModel.from_pretrained`)"}[what]
    load = (f'from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
            f'base = AutoModelForCausalLM.from_pretrained("{base_name}")\nmodel = PeftModel.from_pretrained(base, '
            f'"PATH")\ntok = AutoTokenizer.from_pretrained("PATH")' if what == "adapter" else
            'from transformers import AutoModelForCausalLM, AutoTokenizer\n\nmodel = '
            'AutoModelForCausalLM.from_pretrained("PATH")\ntok = AutoTokenizer.from_pretrained("PATH")\n'
            'ids = tok("ROMEO:", return_tensors="pt").input_ids\n'
            'print(tok.decode(model.generate(ids, max_new_tokens=40, do_sample=True)[0]))')
    not_covered = "\n".join(f"- {x}" for x in privacy.get("not_covered") or [])
    tokenizer_note = {"gpt2": "the byte tokenizer (no vocabulary learned from data)" if cfg.model.tokenizer is None
                      else "the BPE tokenizer of `model.tokenizer`: covered only if it was trained on public text",
                      "merged": "the base model's tokenizer (public)", "adapter": "the base model's tokenizer (public)"}[what]
    if private:
        weak = ("**Weak guarantee**: delta is above 1e-3 (few units to protect), so this guarantee means little.\n\n"
                if privacy.get("weak") else "")
        guarantee = (f"## Privacy guarantee\n\n{weak}| | |\n|---|---|\n{table}\n\n{privacy.get('guarantee', '')}\n\n"
                     f"This export is computed from the round-{round_index} checkpoint"
                     + (" and the public base model" if what != "gpt2" else "") +
                     " alone, so the guarantee covers it (post-processing). The tokenizer is " + tokenizer_note +
                     ". `privacy.json` here holds the ledger of every round's mechanism: `privlm epsilon --ledger "
                     "privacy.json` recomputes epsilon from it with dp-accounting.\n\n"
                     f"Not covered (kept with the operator in the run directory, not in this export):\n\n{not_covered}\n")
    else:
        guarantee = ("## Privacy guarantee\n\nNone: this model was trained without differential privacy.\n\n"
                     f"| | |\n|---|---|\n{table}\n")
    if audit is not None:
        a_rows = "\n".join(f"| {k} | {fmt(v)} |" for k, v in audit.items())
        guarantee += ("\n## Privacy audit\n\n`privlm audit` ran on the round-" + fmt(audit.get("round")) +
                      " checkpoint. Its figures are computed from clients' data and the run's canaries, so NOT "
                      f"covered by the guarantee (exported with --include-audit):\n\n| | |\n|---|---|\n{a_rows}\n")
        if audit.get("broken"):
            guarantee += "\n**The audit's lower bound exceeds the claimed epsilon: the implementation is broken.**\n"
    if metrics is not None:
        guarantee += (f"\n## Held-out metrics (round {metrics['round']})\n\nloss {fmt(metrics['eval_loss'])} "
                      f"nats/token, next-token accuracy {fmt(metrics['eval_accuracy'])}; computed from clients' "
                      "held-out data without noise, so NOT covered by the guarantee (exported with --include-metrics).\n")
    body = (f"# Language model trained with privlm\n\nFederated training with privlm; this directory is {weights}.\n\n"
            f"```python\n{load}\n```\n\n{guarantee}")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def card_metadata(out: Path) -> dict:
    """The metadata of an export's model card (for tests and tools)."""
    from huggingface_hub import ModelCard

    return ModelCard.load(str(out / "README.md")).data.to_dict()


__all__ = ["card_metadata", "export_run", "model_card", "verified_privacy"]

"""Resume: load the last durable state of a run directory; never forget a spent round.

The ledger on disk is the truth about what was spent. Rounds after the saved state were paid
for but their results are gone. With seeded noise (and in non-private runs) such a round is
replayed bit for bit under its existing entry: the same sampling, batches and noise give the
same release, so it is not paid twice. With secure noise the lost round's entry is marked
``lost`` and stays counted, and the round runs again with fresh noise under a new entry.

Everything read is checked against what this run wrote: the ledger's hash chain against
ledger-head.json and the resume state, the runtime, mode and mechanism state against
config.toml, the scrub record and canary plan, and the checkpoints against the ledger.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from privlm.audit import load_plan
from privlm.errors import DataError
from privlm.federated import dp_fedavg
from privlm.federated.client import get_params
from privlm.privacy.ledger import Ledger
from privlm.rundir import RunDir, read_json
from privlm.rundir import remove_stale_token_files

if TYPE_CHECKING:
    from privlm.engine.rounds import Engine

log = logging.getLogger(__name__)


def load_for_resume(engine: Engine, rd: RunDir) -> tuple[dp_fedavg.ServerState, list[dict]]:
    if rd.remove_partial_writes() + remove_stale_token_files(rd.path):
        log.info("%s: removed temp files of writes interrupted by the crash", rd.path)
    if not rd.privacy_path.exists():
        if rd.state_path.exists():
            raise DataError(f"{rd.privacy_path}: missing, but {rd.state_path.name} exists; "
                            "the ledger is gone, refusing to guess what was spent")
        log.warning("%s: the run had not started; starting it from round 0", rd.path)
        return engine.start(rd, restart=True)
    ledger = _read_ledger(engine, rd)
    if not rd.state_path.exists() and len(ledger) == 0:
        log.warning("%s: the run had not started; starting it from round 0", rd.path)
        return engine.start(rd, restart=True)
    _check_own_files(engine, rd)
    done, params, opt_state, paid_entries, saved_mech, state_digest = rd.load_state()
    check_audit(rd, done)
    metrics = [m for m in rd.read_metrics() if m["round"] <= done]  # (validated before anything is written)
    mechanism = engine.algo.mechanism
    try:
        mech_state = mechanism.load_state(saved_mech)
    except ValueError as e:
        raise DataError(f"{rd.state_path}: its mechanism state does not match config.toml's mechanism "
                        f"({e}); is config.toml the run's own?") from None
    if len(ledger) < paid_entries:
        raise DataError(f"{rd.privacy_path}: {len(ledger)} ledger entries, but the resume state was "
                        f"saved after {paid_entries}; refusing to under-count (stale privacy.json?)")
    if state_digest is None or ledger.digest(paid_entries) != state_digest:
        raise DataError(f"{rd.privacy_path}: its first {paid_entries} ledger entries are not the ones "
                        f"{rd.state_path.name} was saved after (digest mismatch); refusing an edited "
                        "or replaced ledger")
    unknown = set(ledger.silos()) - set(engine.population.client_ids)
    if unknown:
        raise DataError(f"{rd.privacy_path}: ledger has silos {sorted(unknown)[:3]} that the data "
                        "no longer has; refusing to forget what they spent")
    _check_tensors(engine, rd, params, opt_state)
    _check_rounds_paid(engine, rd, ledger, done)
    engine.accounts.load(ledger)
    engine.protocol.after_resume(rd)
    engine.write_privacy(rd, done)  # (lost marks, if any, and the exact epsilon of the ledger)
    return dp_fedavg.ServerState(params=params, opt_state=opt_state, round=done, mechanism=mech_state), metrics


def _read_ledger(engine: Engine, rd: RunDir) -> Ledger:
    """privacy.json's ledger, refused unless it is this run's and extends what was paid."""
    record = rd.read_privacy()
    if not isinstance(record, dict):
        raise DataError(f"{rd.privacy_path}: corrupt (not a JSON object)")
    runtime = engine.population.runtime
    kind = record.get("runtime") or ("flower" if "Flower nodes" in str(record.get("population")) else "in-process")
    if kind != runtime:
        raise DataError(f"{rd.privacy_path}: a run on the {kind} runtime; it cannot be resumed {runtime}"
                        " (the server would load every node's data itself): start a new run instead")
    mode = engine.privacy.mode
    if record.get("mode") != mode:
        raise DataError(f"{rd.privacy_path}: mode {record.get('mode')!r} does not match config.toml's {mode!r}")
    return read_paid_ledger(rd, record, mode)


def read_paid_ledger(rd: RunDir, record: dict, mode: str) -> Ledger:
    """privacy.json's ledger, refused unless it extends what ledger-head.json says was paid (or
    the run has not started and there is no head)."""
    try:
        ledger = Ledger.from_list(record.get("ledger"), mode=mode)
    except ValueError as e:
        raise DataError(f"{rd.privacy_path}: corrupt ledger ({e})") from None
    head = rd.read_head()
    if head is None and (len(ledger) or rd.state_path.exists()):
        raise DataError(f"{rd.head_path}: missing, but the run has started; refusing to trust "
                        "privacy.json's ledger without it")
    if head is not None:
        paid, digest = head
        if len(ledger) < paid or ledger.digest(paid) != digest:
            raise DataError(f"{rd.privacy_path}: its ledger ({len(ledger)} entries) does not extend the "
                            f"{paid} entries paid per {rd.head_path.name}; refusing to under-count "
                            "(an older, edited or replaced privacy.json?)")
    return ledger


def _check_own_files(engine: Engine, rd: RunDir) -> None:
    scrubbed = engine.population.scrub_counts is not None
    if (rd.path / "scrub.json").exists() != scrubbed:
        raise DataError(f"{rd.path / 'scrub.json'}: " + ("present, but config.toml does not scrub"
                        if not scrubbed else "missing, but config.toml scrubs")
                        + "; refusing files this run did not write")
    if load_plan(rd.path) != engine.audit_plan:
        raise DataError(f"{rd.path / 'audit'}: the audit canaries differ from the ones this run trained "
                        "with (pass the saved plan: privlm.resume / privlm run --resume load it)")


def check_audit(rd: RunDir, done: int) -> None:
    """An audit.json must be ``privlm audit``'s, of a checkpoint this run released (round <= done)."""
    path = rd.path / "audit.json"
    if not path.exists() and not path.is_symlink():
        return
    record = read_json(path)
    r = record.get("round") if isinstance(record, dict) else None
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= done or not rd.checkpoint_path(r).exists():
        raise DataError(f"{path}: not an audit of a checkpoint of this run (round {r!r}; the run completed "
                        f"{done}); refusing files this run did not write: move it out of the run directory")


def _check_tensors(engine: Engine, rd: RunDir, params: dict, opt_state: dict) -> None:
    reference = get_params(engine.model)
    for name, ref in reference.items():
        if name not in params or params[name].shape != ref.shape or params[name].dtype != ref.dtype:
            raise DataError(f"{rd.state_path}: parameter {name!r} missing or not {tuple(ref.shape)} "
                            f"{ref.dtype}; is config.toml the run's own?")
    if set(params) != set(reference) or set(opt_state) != set(engine.algo.server_optimizer.init(reference)):
        raise DataError(f"{rd.state_path}: its tensors do not match the model and server optimizer")


def _check_rounds_paid(engine: Engine, rd: RunDir, ledger: Ledger, done: int) -> None:
    """Every completed round has its entry; rounds paid after the state are replayed or marked lost."""
    for r in range(1, done + 1 if engine.privacy.mode != "example" else 1):  # (a silo-round may cost nothing)
        if ledger.entry_for(r) is None:
            raise DataError(f"{rd.privacy_path}: no ledger entry for round {r}, which the resume "
                            "state says completed; refusing to under-count")
    if engine.privacy.mode == "user":  # every entry is of the kind config.toml's mechanism pays for its
        mech = engine.algo.mechanism  # round (its z, q may have changed since: each segment is described)
        for e in ledger:
            if not e.lost and (e.group != mech.group(e.round) or type(e.event) is not type(mech.event(e.round))):
                raise DataError(f"{rd.privacy_path}: round {e.round} was paid for with a different mechanism "
                                "than config.toml describes; refusing a ledger this run did not write")
    if engine.replayable:
        later = sorted({e.round for e in ledger if e.round > done and not e.lost})
        if later and later != [done + 1]:
            raise DataError(f"{rd.privacy_path}: ledger entries for rounds {later} after the saved "
                            f"round {done}; the run directory is inconsistent")
    else:
        for e in ledger.mark_lost_after(done):
            log.warning("round %d was paid for but its result was lost; it stays counted "
                        "and runs again with fresh noise", e.round)
            # Correlated noise: the lost release is one more row of the strategy matrix, which
            # costs more than its own entry (privlm.mechanisms.banded_mf); paid now, as lost.
            for event, group in engine.algo.mechanism.lost_surcharge(e.round):
                ledger.append(e.round, event, lost=True, group=group)
    last_paid = max((e.round for e in ledger), default=0)
    beyond = [r for r in rd.checkpoints() if r > max(last_paid, done)]
    if beyond:
        raise DataError(f"{rd.checkpoint_path(beyond[0])}: a checkpoint of a round the ledger never paid "
                        "for; refusing files this run did not write")

"""The run directory: the contract between a run, its users and later commands.

    config.toml                         fully resolved configuration
    metrics.jsonl                       one JSON object per round
    privacy.json                        the ledger and the guarantee it implies
    ledger-head.json                    entries paid and the ledger's chain head (written
                                        after each ledger write: a ledger shorter than
                                        this, or not extending it, is refused)
    scrub.json                          PII values replaced per entity type (summed client counts)
    checkpoints/round-NNNN.safetensors  global parameters (round 0 = initial)
    state.safetensors                   resume state: the last completed round's
                                        parameters and server-optimizer state
    report.html                         self-contained report
    .lock                               held (flock) by the live run, if any

Every file is written atomically (temp file in the same directory, fsync,
rename, fsync of the directory), so a crash leaves either the old or the new
version, never a torn one. Only safetensors, JSON and TOML are read back.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
import tempfile
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from privlm.errors import DataError
from privlm.faults import enospc_point, fault_point

if TYPE_CHECKING:  # torch is imported where tensors are written or read: reading a ledger needs none
    import torch


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, data: bytes, fault: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            enospc_point()  # (tests: the disk fills up half-way through this file)
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        fault_point("mid-write")  # crash tests: die with the temp file complete, not renamed
        if fault:
            fault_point(fault)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    # -- paths -------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def privacy_path(self) -> Path:
        return self.path / "privacy.json"

    @property
    def head_path(self) -> Path:
        return self.path / "ledger-head.json"

    @property
    def report_path(self) -> Path:
        return self.path / "report.html"

    @property
    def state_path(self) -> Path:
        return self.path / "state.safetensors"

    def checkpoint_path(self, round_index: int) -> Path:
        return self.path / "checkpoints" / f"round-{round_index:04d}.safetensors"

    # -- ownership -----------------------------------------------------------
    def lock(self) -> None:
        """Take the directory's lock, or refuse: one live run per directory.

        An ``flock`` on ``.lock``: the kernel drops it when the process dies,
        however it dies, so a crashed run never leaves a stale lock behind.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataError(f"{self.path}: in use by a live run (pid {holder}); "
                            "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def remove_partial_writes(self) -> list[Path]:
        """Delete temp files that a crash left mid-``atomic_write`` of a file privlm names
        (``.<name>.<random>.tmp``); a user's own hidden files are left alone."""
        ours = {self.config_path.name, self.metrics_path.name, self.privacy_path.name, self.head_path.name,
                self.state_path.name, self.report_path.name, "scrub.json"}
        found = [p for p in self.path.glob(".*.tmp") if p.name[1:].rsplit(".", 2)[0] in ours]
        found += [p for p in (self.path / "checkpoints").glob(".round-*.tmp")]
        for p in found:
            p.unlink(missing_ok=True)
        return found

    # -- writing -----------------------------------------------------------
    def check_new(self) -> None:
        """Refuse, before anything is written, a path a new run cannot own: a file, a run, or
        a folder holding anything else (a run never adopts or overwrites another's files)."""
        if self.path.exists() and not self.path.is_dir():
            raise DataError(f"{self.path}: exists and is not a directory; choose another --out")
        if self.privacy_path.exists() or self.metrics_path.exists() or self.state_path.exists():
            raise DataError(f"{self.path}: already holds a run; choose another --out "
                            "(or continue it with --resume)")
        # (ours: the lock; the Flower launchers' flower/ and an empty checkpoints/, made before the run)
        if self.path.is_dir() and any(p.name not in (".lock", "flower", "checkpoints")
                                      or (p.name == "checkpoints" and any(p.iterdir()))
                                      for p in self.path.iterdir()):
            raise DataError(f"{self.path}: not empty; a new run needs a new or empty directory (--out)")

    def create(self) -> None:
        """Make a fresh run directory; refuse one that already holds a run or anything else."""
        self.check_new()
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)

    def write_config(self, toml_text: str) -> None:
        atomic_write(self.config_path, toml_text.encode())

    def write_privacy(self, record: dict, ledger_json: str | None = None) -> None:
        """privacy.json; ``ledger_json`` (the ledger as JSON text, ``Ledger.to_json``) is spliced
        in as its ``ledger`` key, so a long ledger is not serialised again on every write."""
        text = json.dumps(record, indent=2)
        if ledger_json is not None:
            if "ledger" in record or not text.endswith("\n}"):
                raise ValueError("give the ledger once: in the record or as ledger_json")
            text = text[:-2] + ',\n  "ledger": ' + ledger_json + "\n}"
        atomic_write(self.privacy_path, (text + "\n").encode())

    def write_head(self, entries: int, digest: str) -> None:
        """How many ledger entries have been paid and their chain head (after privacy.json)."""
        atomic_write(self.head_path, (json.dumps({"entries": entries, "digest": digest}) + "\n").encode())

    def read_head(self) -> tuple[int, str] | None:
        if not self.head_path.exists():
            return None
        data = read_json(self.head_path)
        entries, digest = (data.get("entries"), data.get("digest")) if isinstance(data, dict) else (None, None)
        if not (isinstance(entries, int) and not isinstance(entries, bool) and entries >= 0
                and isinstance(digest, str)):
            raise DataError(f"{self.head_path}: corrupt (want {{\"entries\": N, \"digest\": \"...\"}})")
        return entries, digest

    def write_scrub(self, record: dict) -> None:
        atomic_write(self.path / "scrub.json", (json.dumps(record, indent=2) + "\n").encode())

    def read_scrub(self) -> dict | None:
        path = self.path / "scrub.json"
        return read_json(path) if path.exists() else None

    def write_metrics(self, rows: list[dict]) -> None:
        data = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write(self.metrics_path, data.encode())

    def save_checkpoint(self, round_index: int, params: dict[str, torch.Tensor]) -> Path:
        from safetensors.torch import save

        path = self.checkpoint_path(round_index)
        tensors = {k: v.detach().contiguous() for k, v in params.items()}
        # One metadata key: safetensors writes several in no fixed order (checkpoints are compared
        # byte for byte across runs).
        meta = {"privlm": json.dumps({"round": round_index, "tensors_sha256": tensors_digest(tensors)})}
        atomic_write(path, save(tensors, metadata=meta), "mid-write-checkpoint")
        return path

    def save_state(self, round_index: int, params: dict[str, torch.Tensor],
                   opt_state: dict[str, dict[str, torch.Tensor]], ledger_entries: int = 0,
                   mechanism: dict[str, object] | None = None, ledger_digest: str = "") -> None:
        """The resume state after ``round_index``: parameters, server-optimizer slots, and the
        mechanism's state (named JSON values, e.g. adaptive clipping's ``clip_norm``, and tensors,
        e.g. banded MF's last noise draws, stored as ``mech/<name>`` beside the parameters)."""
        import torch
        from safetensors.torch import save

        tensors = {f"params/{k}": v.detach().contiguous() for k, v in params.items()}
        for slot, values in opt_state.items():
            tensors.update({f"opt/{slot}/{k}": v.detach().contiguous() for k, v in values.items()})
        tensors.update({f"mech/{k}": v.detach().contiguous() for k, v in (mechanism or {}).items()
                        if isinstance(v, torch.Tensor)})
        # ledger_entries: how many ledger entries had paid when this state was made (a resume
        # refuses a ledger shorter than that: a stale or swapped privacy.json).
        # One metadata key: safetensors writes several in no fixed order, and the chaos test
        # compares state files byte for byte.
        # ledger_digest: the ledger's chain head after those entries (a resume refuses a ledger
        # whose first ledger_entries entries are not exactly the ones paid then).
        info = {"round": round_index, "ledger_entries": ledger_entries, "ledger_digest": ledger_digest,
                "tensors_sha256": tensors_digest(tensors)}  # flipped bytes are refused on resume
        for key, value in (mechanism or {}).items():  # (float repr round-trips)
            if isinstance(value, torch.Tensor):
                continue
            if key in info or key in _STATE_KEYS:
                raise ValueError(f"mechanism state key {key!r} is reserved")
            info[key] = value
        meta = {"state": json.dumps(info)}
        atomic_write(self.state_path, save(tensors, metadata=meta))

    # -- reading -----------------------------------------------------------
    def load_state(self) -> tuple[int, dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], int,
                                  dict[str, object], str | None]:
        """Inverse of :meth:`save_state`; a missing or corrupt file is an error, never a fresh start."""
        import torch

        path = self.state_path
        if not path.exists():
            raise DataError(f"{path}: no resume state (the run never completed a round "
                            "with this version of privlm); start a new run instead")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            info = json.loads(meta["state"])
            round_index, ledger_entries = int(info["round"]), int(info["ledger_entries"])
            digest = info.get("ledger_digest")
            if digest is not None and not isinstance(digest, str):
                raise ValueError("ledger_digest is not a string")
            if round_index < 0 or ledger_entries < 0:
                raise ValueError(f"round {round_index} / ledger_entries {ledger_entries} is negative")
            if info.get("tensors_sha256") != tensors_digest(tensors):
                raise ValueError("its tensors do not match their SHA-256 (damaged bytes)")
            mechanism = {k: v for k, v in info.items() if k not in _STATE_KEYS}  # the mechanism checks it
        except Exception as e:  # safetensors raises its own error types
            raise DataError(f"{path}: corrupt resume state ({type(e).__name__}: {e})") from None
        params: dict[str, torch.Tensor] = {}
        opt_state: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            kind, _, rest = key.partition("/")
            if kind == "params":
                params[rest] = t
            elif kind == "opt" and "/" in rest:
                slot, _, name = rest.partition("/")
                opt_state.setdefault(slot, {})[name] = t
            elif kind == "mech" and rest and rest not in mechanism:
                mechanism[rest] = t  # (the mechanism's load_state checks it)
            else:
                raise DataError(f"{path}: corrupt resume state (unexpected tensor {key!r})")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise DataError(f"{path}: corrupt resume state (tensor {key!r} holds NaN or Inf)")
        return round_index, params, opt_state, ledger_entries, mechanism, digest

    def read_privacy(self) -> dict:
        return read_json(self.privacy_path)

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        rows = []
        try:
            text = self.metrics_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{self.metrics_path}: cannot read ({e})") from None
        for i, line in enumerate(text.splitlines(), 1):
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise DataError(f"{self.metrics_path}:{i}: corrupt JSON ({getattr(e, 'msg', 'nested too deeply')})") from None
            if not (isinstance(row, dict) and isinstance(row.get("round"), int)):
                raise DataError(f"{self.metrics_path}:{i}: not a metrics row (a JSON object with a 'round')")
            rows.append(row)
        return rows

    def checkpoints(self) -> list[int]:
        """Rounds of the checkpoints privlm names ``round-NNNN.safetensors``; other files are not its own."""
        found = []
        for p in (self.path / "checkpoints").glob("round-*.safetensors"):
            digits = p.name[len("round-"):-len(".safetensors")]
            if digits.isascii() and digits.isdigit() and len(digits) >= 4:
                found.append(int(digits))
        return sorted(found)

    def latest_checkpoint(self) -> tuple[int, dict[str, torch.Tensor]]:
        rounds = self.checkpoints()
        if not rounds:
            raise DataError(f"{self.path / 'checkpoints'}: no checkpoint found")
        from safetensors.torch import load_file

        r = rounds[-1]
        path = self.checkpoint_path(r)
        try:
            with safe_open(path, framework="pt") as f:
                info = json.loads((f.metadata() or {}).get("privlm", "{}"))
            expected = info.get("tensors_sha256") if isinstance(info, dict) else None
            tensors = load_file(path)
        except Exception as e:  # safetensors raises its own error types
            raise DataError(f"{path}: unreadable checkpoint ({e})") from None
        if expected is not None and expected != tensors_digest(tensors):
            raise DataError(f"{path}: its tensors do not match their SHA-256 (damaged bytes)")
        return r, tensors


MAX_JSON_BYTES = 512 * 2**20  # privacy.json of ~2M ledger entries


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``tensors`` (in name order)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_json(path: Path) -> dict:
    """A run-directory JSON file: a regular file of bounded size, parsed; any problem names it."""
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise DataError(f"{path}: not a regular file")
            raw = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise DataError(f"{path}: not found (is this a privlm run directory?)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise DataError(f"{path}: larger than {MAX_JSON_BYTES:,} bytes")
    try:
        return json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: corrupt JSON ({e})") from None
    except RecursionError:
        raise DataError(f"{path}: corrupt JSON (nested too deeply)") from None


def open_run_dir(path: Path) -> RunDir:
    rd = RunDir(path)
    if not rd.config_path.exists():
        raise DataError(f"{path}: not a privlm run directory (no config.toml)")
    return rd


_STATE_KEYS = ("round", "ledger_entries", "ledger_digest", "tensors_sha256")  # the rest: the mechanism's


# Worker processes' token files (privlm.runtime.workers): in the run directory only while they start.
TOKEN_FILE_PREFIX = ".privlm-worker-tokens-"  # the only names privlm owns in a run directory
TOKEN_FILE_GLOB = TOKEN_FILE_PREFIX + "*.npy"


def remove_stale_token_files(workdir: Path) -> list[Path]:
    """Delete the token files a run killed during worker start-up left in ``workdir``.

    A started pool leaves none (they are unlinked once every worker has mapped them),
    but a SIGKILL between writing them and the workers' start cannot clean up. Only
    privlm's own names (``.privlm-worker-tokens-*.npy``) are touched; returns those removed.
    """
    stale = sorted(p for p in Path(workdir).glob(TOKEN_FILE_GLOB) if not p.is_dir())
    for p in stale:
        p.unlink(missing_ok=True)
    return stale

"""Data sources, all producing a :class:`FederatedCorpus` (one client per data owner).

=====================  ========================================================
``data.source``        what it reads
=====================  ========================================================
``synthetic-clinic``   generated patients with planted PII (built in; the default)
``shakespeare``        MIT Shakespeare plays, one client per (play, role)
``tinyshakespeare``    char-rnn tiny shakespeare, one client per speaker
``dir``                a folder of ``<client_id>.txt`` / ``<client_id>.jsonl`` files
``jsonl``              one JSON-lines file with ``client_id`` and ``text`` per row
=====================  ========================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from privlm.data._common import MAX_FILE_BYTES, MAX_LINE_CHARS, data_error
from privlm.data.clinic import ENTITY_TYPES, PiiSpan, example_text, generate_clinic, generate_clinic_with_pii
from privlm.data.corpus import ClientData, FederatedCorpus
from privlm.data.download import data_root, default_data_path, download
from privlm.data.mit_shakespeare import load_shakespeare
from privlm.data.tinyshakespeare import load_tinyshakespeare
from privlm.data.userdata import load_dir, load_jsonl
from privlm.errors import DataError

if TYPE_CHECKING:
    from privlm.config import RunConfig

SOURCES: tuple[str, ...] = ("synthetic-clinic", "shakespeare", "tinyshakespeare", "dir", "jsonl")

__all__ = [
    "ENTITY_TYPES",
    "MAX_FILE_BYTES",
    "MAX_LINE_CHARS",
    "SOURCES",
    "corpus_of",
    "ClientData",
    "FederatedCorpus",
    "PiiSpan",
    "data_root",
    "default_data_path",
    "download",
    "example_text",
    "generate_clinic",
    "generate_clinic_with_pii",
    "load_corpus",
    "load_dir",
    "load_jsonl",
    "load_shakespeare",
    "load_tinyshakespeare",
]


def corpus_of(cfg: RunConfig) -> FederatedCorpus:
    """The corpus a run's ``[data]`` section names (before scrubbing, canaries and silos)."""
    return load_corpus(cfg.data.source, cfg.data.path, cfg.data.num_clients, cfg.seed)


def load_corpus(source: str, path: Path | None, num_clients: int, seed: int) -> FederatedCorpus:
    """Load the corpus that ``data.source`` names.

    ``num_clients`` and ``seed`` are used by ``synthetic-clinic`` only (which
    ignores ``path``); the other sources return every client they find.
    ``shakespeare`` and ``tinyshakespeare`` read :func:`default_data_path`
    when ``path`` is None; ``dir`` and ``jsonl`` need a path.
    """
    if source == "synthetic-clinic":
        return generate_clinic(num_clients, seed)
    if source in ("shakespeare", "tinyshakespeare"):
        if path is None:
            path = default_data_path(source)
            if not path.exists():
                raise data_error(
                    f"{source} data not found at {path}; run `privlm data download {source}` or set data.path"
                )
        loader = load_shakespeare if source == "shakespeare" else load_tinyshakespeare
        return loader(Path(path))
    if source in ("dir", "jsonl"):
        if path is None:
            raise DataError(f"data.source '{source}' needs data.path (a {'directory' if source == 'dir' else '.jsonl file'})")
        return load_dir(Path(path)) if source == "dir" else load_jsonl(Path(path))
    raise DataError(f"data.source {source!r} is not a known data source; choose one of: {', '.join(SOURCES)}")

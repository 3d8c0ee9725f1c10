"""Parameters and updates as Flower records: named NumPy arrays, never pickle.

Flower's ``Array`` serialises with ``np.save(allow_pickle=False)`` and reads
with ``np.load(allow_pickle=False)``, and streams large arrays in chunks, so a
model of a few hundred MB travels without any message-size setting.
Decoding what a node sent never raises: it returns either the tensors or the
reason they are unusable, and the server rejects (and logs) the latter like
any malformed update.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

PARAMS = "params"  # ArrayRecord: the global parameters (server -> node)
UPDATE = "update"  # ArrayRecord: local - global (node -> server)
CONFIG = "config"  # ConfigRecord: round, run config text, ...
METRICS = "metrics"  # MetricRecord: what the node reports besides the update


def to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Named tensors as an ArrayRecord (names sorted, so both ends agree on order)."""
    arrays = {}
    for name in sorted(tensors):
        t = tensors[name].detach().cpu()
        if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: send it widened, exactly
            t = t.to(torch.float32)
        arrays[name] = Array(np.ascontiguousarray(t.numpy()))
    return ArrayRecord(arrays)


def from_record(record: object, reference: Mapping[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor] | str:
    """The tensors of ``record``, cast to ``reference``'s bfloat16 where it has one; or why not.

    Only structure is checked here (a record of NumPy arrays that load without
    pickle); names, shapes, dtypes and values are checked by
    :func:`privlm.federated.aggregation.validate_update` like any update.
    """
    if not isinstance(record, ArrayRecord):
        return f"content is a {type(record).__name__}, not an ArrayRecord"
    out = {}
    for name, array in record.items():
        try:
            values = array.numpy()
        except Exception as e:  # unloadable bytes, a pickled array, a foreign stype
            return f"{name!r}: not a NumPy array ({type(e).__name__}: {str(e)[:80]})"
        if values.dtype.kind not in "fiub" or values.dtype.byteorder == ">":
            return f"{name!r}: dtype {values.dtype} is not a plain number type"
        t = torch.from_numpy(np.array(values, copy=True))
        if reference is not None and name in reference and reference[name].dtype == torch.bfloat16 \
                and t.dtype == torch.float32:
            t = t.to(torch.bfloat16)
        out[name] = t
    return out


def content_record(message: Message, key: str) -> object:
    """``message.content[key]`` of whatever type it is, or None (never raises)."""
    try:
        content = message.content
        if key in content.array_records:
            return content.array_records[key]
        if key in content.config_records:
            return content.config_records[key]
        if key in content.metric_records:
            return content.metric_records[key]
    except Exception:
        return None
    return None

"""Send a model as one array per dtype instead of one array per tensor.

Why: Flower 1.41 moves every `Array` of an `ArrayRecord` as its own object — one authenticated
HTTP request per hop (ServerApp → SuperLink → SuperNode → ClientApp and back: six hops). HAFNet's
`cpu` preset has 88 tensors, so one train message costs ~530 requests per school. On this machine
(loopback, TLS + node auth, 3 schools) that was 62 s of overhead per round; the same floats packed
into one array: 3.2 s (benchmarks/deploy.json, modes warm+poll vs warm+poll+packed).

FedAvg stays exact: Flower's `aggregate_arrayrecords` averages key by key and element by element,
so averaging packed vectors equals packing the averaged tensors. Validation that needs tensors
(update norms, shapes) unpacks first.

    arrays, layout = pack(model.state_dict())              # sender
    content = RecordDict({"arrays": arrays, "layout": layout, ...})
    state = unpack(content["arrays"], content["layout"])   # receiver: {name: np.ndarray}
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

PREFIX = "packed-"
LAYOUT_KEY = "layout"


class PackingError(ValueError):
    """The packed arrays and their layout do not match."""


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        return value.detach().cpu().numpy()
    if isinstance(value, Array):
        return value.numpy()
    return np.asarray(value)


def pack(state: Mapping[str, Any]) -> tuple[ArrayRecord, ConfigRecord]:
    """{name: tensor} (a state_dict, numpy dict or ArrayRecord) → (one array per dtype, layout)."""
    items = [(str(name), _numpy(value)) for name, value in state.items()]
    if not items:
        raise PackingError("nothing to pack: the state is empty")
    groups: dict[str, list[np.ndarray]] = {}
    layout = []
    for name, arr in items:
        dtype = arr.dtype.str
        groups.setdefault(dtype, []).append(np.ascontiguousarray(arr).reshape(-1))
        layout.append([name, dtype, list(arr.shape)])
    record = ArrayRecord({f"{PREFIX}{np.dtype(d).name}": Array(np.concatenate(parts)) for d, parts in groups.items()})
    return record, ConfigRecord({LAYOUT_KEY: json.dumps(layout)})


def unpack(arrays: ArrayRecord, layout: ConfigRecord) -> dict[str, np.ndarray]:
    """The inverse of `pack` (arrays may be the FedAvg average of packed replies)."""
    try:
        entries = json.loads(str(layout[LAYOUT_KEY]))
    except (KeyError, json.JSONDecodeError) as exc:
        raise PackingError(f"layout record: missing or malformed '{LAYOUT_KEY}' ({exc})") from None
    flat = {key[len(PREFIX):]: arrays[key].numpy().reshape(-1) for key in arrays.keys() if key.startswith(PREFIX)}
    offsets = {name: 0 for name in flat}
    out: dict[str, np.ndarray] = {}
    for name, dtype, shape in entries:
        group = np.dtype(dtype).name
        if group not in flat:
            raise PackingError(f"tensor {name!r}: no packed array '{PREFIX}{group}'")
        size = int(np.prod(shape, dtype=np.int64)) if shape else 1
        start = offsets[group]
        if start + size > flat[group].size:
            raise PackingError(f"tensor {name!r}: packed array '{PREFIX}{group}' is too short")
        out[name] = flat[group][start:start + size].astype(np.dtype(dtype), copy=False).reshape(shape)
        offsets[group] = start + size
    for group, used in offsets.items():
        if used != flat[group].size:
            raise PackingError(f"packed array '{PREFIX}{group}' has {flat[group].size - used} values the layout does not name")
    return out

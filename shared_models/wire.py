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

In the fedfer apps the packing is transport only: `server.transport.PackedGrid` (wrapped around the ServerApp's grid)
packs the "arrays" record of every message it sends and unpacks every reply before the strategy
sees it, so the strategy, Flower's DP wrapper, validation, FedAvg and the checkpoints all work on
the ordinary {tensor name: array} record. The ClientApp unpacks with `unpack_content` and, when the
request was packed, packs its reply (`pack_content`). A reply whose packed arrays do not match its
layout (wrong length, wrong dtype, malformed) is not unpacked: its content is replaced by a
`packing-error` record, which the strategy rejects with one line naming the school.
"""

from __future__ import annotations

import io
import json
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

PREFIX = "packed-"
LAYOUT_KEY = "layout"
ARRAYS = "arrays"            # the RecordDict key of the model in fedfer's messages
LAYOUT_RECORD = "layout"     # the RecordDict key of the layout ConfigRecord next to it
ERROR_RECORD = "packing-error"  # set by PackedGrid on a reply that does not unpack
MAX_TENSORS = 100_000


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


def received_numpy(array: Array, name: str) -> np.ndarray:
    """An Array from another party as a numpy array, its .npy header checked before anything is allocated:
    Flower's `Array.numpy()` allocates whatever shape the header declares (terabytes for a few bytes of
    data) and raises numpy's own errors for object data or a foreign serialisation. PackingError names `name`."""
    if array.stype != "numpy.ndarray":
        raise PackingError(f"array {name!r}: serialised as {str(array.stype)[:40]!r}, not numpy.ndarray")
    buffer = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, _, dtype = read_header(buffer)
    except (KeyError, ValueError, TypeError, EOFError) as exc:
        raise PackingError(f"array {name!r}: not a .npy array ({' '.join(str(exc).split())[:80]})") from None
    if dtype.hasobject:
        raise PackingError(f"array {name!r}: holds Python objects, not numbers")
    size = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if size != len(array.data) - buffer.tell():
        raise PackingError(f"array {name!r}: its header declares shape {tuple(shape)} of {dtype} "
                           f"({size} bytes) but it carries {len(array.data) - buffer.tell()}")
    try:
        return array.numpy()
    except (ValueError, TypeError) as exc:
        raise PackingError(f"array {name!r}: {' '.join(str(exc).split())[:80]}") from None


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


def unpack(arrays: ArrayRecord, layout: ConfigRecord, strict: bool = False) -> dict[str, np.ndarray]:
    """The inverse of `pack` (arrays may be the FedAvg average of packed replies).

    strict: every packed array must hold exactly the dtype its key names (`packed-float32` holds
    float32) — for arrays received from another party. Without it a group averaged by FedAvg
    (int64 → float64) is cast back to the layout's dtype.
    """
    try:
        entries = json.loads(str(layout[LAYOUT_KEY]))
    except (KeyError, json.JSONDecodeError) as exc:
        raise PackingError(f"layout record: missing or malformed '{LAYOUT_KEY}' ({exc})") from None
    if not isinstance(entries, list) or not entries or len(entries) > MAX_TENSORS:
        raise PackingError(f"layout: expected a list of 1..{MAX_TENSORS} [name, dtype, shape] entries")
    flat: dict[str, np.ndarray] = {}
    for key in arrays.keys():
        if not key.startswith(PREFIX):
            raise PackingError(f"unexpected array {key!r} next to the packed arrays")
        value = received_numpy(arrays[key], key).reshape(-1)
        group = key[len(PREFIX):]
        if strict and value.dtype.name != group:
            raise PackingError(f"packed array '{key}' holds {value.dtype.name}, not {group}")
        flat[group] = value
    offsets = {name: 0 for name in flat}
    out: dict[str, np.ndarray] = {}
    for entry in entries:
        name, dtype, shape = _layout_entry(entry)
        if name in out:
            raise PackingError(f"layout names tensor {name!r} twice")
        group = dtype.name
        if group not in flat:
            raise PackingError(f"tensor {name!r}: no packed array '{PREFIX}{group}'")
        size = int(np.prod(shape, dtype=np.int64)) if shape else 1
        start = offsets[group]
        if start + size > flat[group].size:
            raise PackingError(f"tensor {name!r}: packed array '{PREFIX}{group}' is too short")
        out[name] = flat[group][start:start + size].astype(dtype, copy=False).reshape(shape)
        offsets[group] = start + size
    for group, used in offsets.items():
        if used != flat[group].size:
            raise PackingError(f"packed array '{PREFIX}{group}' has {flat[group].size - used} values the layout does not name")
    return out


def _layout_entry(entry: Any) -> tuple[str, np.dtype, list[int]]:
    """One `[name, dtype, shape]` layout entry, checked (it may come from another party)."""
    try:
        name, dtype, shape = entry
        dt = np.dtype(str(dtype))
    except (TypeError, ValueError) as exc:
        raise PackingError(f"layout entry {str(entry)[:80]!r}: not [name, dtype, shape] ({exc})") from None
    if not isinstance(name, str) or not name:
        raise PackingError(f"layout entry {str(entry)[:80]!r}: the name must be a non-empty string")
    if dt.kind not in "biuf" or dt.hasobject:
        raise PackingError(f"tensor {name!r}: dtype {dt} is not a numeric dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise PackingError(f"tensor {name!r}: shape {str(shape)[:80]} is not a list of non-negative integers")
    return name, dt, shape


# -- message content --------------------------------------------------------------------------------
def is_packed(content: RecordDict) -> bool:
    return LAYOUT_RECORD in content.config_records and ARRAYS in content.array_records


def pack_content(content: RecordDict) -> RecordDict:
    """A copy of `content` whose "arrays" record is packed, with the layout next to it."""
    arrays, layout = pack(content.array_records[ARRAYS])
    return with_arrays(content, arrays, layout)


def unpack_content(content: RecordDict, strict: bool = True) -> RecordDict:
    """A copy of `content` with the "arrays" record unpacked (unchanged if it is not packed)."""
    if not is_packed(content):
        return content
    state = unpack(content.array_records[ARRAYS], content.config_records[LAYOUT_RECORD], strict=strict)
    return with_arrays(content, ArrayRecord({k: Array(v) for k, v in state.items()}), None)


def with_arrays(content: RecordDict, arrays: ArrayRecord, layout: ConfigRecord | None) -> RecordDict:
    out = RecordDict()
    for key, record in content.items():
        if key == LAYOUT_RECORD:
            continue
        out[key] = arrays if key == ARRAYS else record
    if layout is not None:
        out[LAYOUT_RECORD] = layout
    return out


def unpack_reply(reply: Message) -> None:
    """Unbundle and unpack a reply in place; one that does not unpack gets a `packing-error` record instead."""
    if reply.has_error() or not (is_packed(reply.content) or is_bundled(reply.content)):
        return
    try:
        reply.content = unpack_content(unbundle(reply.content), strict=True)
    except PackingError as exc:
        reply.content = RecordDict({ERROR_RECORD: ConfigRecord({"reason": str(exc)[:300]})})


def shorten_object_pull_backoff(initial: float = 0.05, cap: float = 0.2) -> bool:
    """Retry a not-yet-available message object after `initial` s (doubling up to `cap`), not 1 s / 10 s.

    Flower sends a message's metadata first and its objects (the model weights) right after; the
    receiver — SuperNode pulling from the SuperLink, ClientApp pulling from its SuperNode, ServerApp
    pulling replies — often asks before they are stored and then backs off 1 s, then 2 s
    (`flwr.supercore.constant.PULL_INITIAL_BACKOFF = 1`, `PULL_BACKOFF_CAP = 10`). Measured here,
    that alone added 1–3 s per message. The cap is short (0.2 s; 0.1 s for the ClientApp pulling from its
    own SuperNode on loopback) because the sender is usually mid-upload: with a 0.5 s cap the receiver
    often slept ~0.3 s past the object's arrival. Both pull functions take the backoff as keyword defaults, so
    setting those defaults in this process changes nothing else. Returns False if Flower changed.
    """
    from flwr.supercore.inflatable import inflatable_utils as pulls

    changed = False
    for fn in (pulls.pull_objects, pulls.pull_and_inflate_object_from_tree):
        defaults = getattr(fn, "__kwdefaults__", None) or {}
        if "initial_backoff" in defaults and "backoff_cap" in defaults:
            defaults["initial_backoff"], defaults["backoff_cap"] = initial, cap
            changed = True
    return changed


# -- one object per message -------------------------------------------------------------------------
# Flower 1.41 moves a message as a tree of objects — Message, RecordDict, then one object per record,
# per Array and per 5 MB chunk of an Array — and every object is its own authenticated HTTP request on
# every hop (ServerApp → SuperLink → SuperNode → ClientApp and back). A packed train message was 7
# objects (config, layout, ArrayRecord, Array, chunk …), a school's reply 9. Bundled, every record of a
# message travels inside one ConfigRecord (arrays as their serialised bytes), so a message is 3 objects.
# Measured on the deployment benchmark (docs/deployment.md §5). Arrays larger than
# BUNDLE_MAX_ARRAY_BYTES in total stay an ordinary ArrayRecord next to the bundle, so Flower still
# chunks a big model.
BUNDLE_RECORD = "fedfer-bundle"
#: A record addressed to one school (what the coordinator's anchor holds of its chain: server/strategy.py, read
#: by client/app.py). It travels beside the bundle, never in it, so every school's message still shares one bundle.
LEDGER_ANCHOR_RECORD = "ledger-anchor"
BUNDLE_MANIFEST = "manifest"
BUNDLE_MAX_ARRAY_BYTES = 4 * 2**20
MAX_BUNDLED_KEYS = 100_000
_KINDS = {"config": "config_records", "metrics": "metric_records", "arrays": "array_records"}


def is_bundled(content: RecordDict) -> bool:
    return BUNDLE_RECORD in content.config_records


def bundle(content: RecordDict, max_array_bytes: int = BUNDLE_MAX_ARRAY_BYTES) -> RecordDict:
    """`content` with its records folded into one ConfigRecord (see above); the inverse is `unbundle`."""
    if is_bundled(content):
        return content
    arrays_inline = sum(len(a.data) for rec in content.array_records.values() for a in rec.values()) <= max_array_bytes
    values: dict[str, Any] = {}
    manifest: list[list[Any]] = []
    out = RecordDict()
    for name, record in content.items():
        kind = "arrays" if isinstance(record, ArrayRecord) else "metrics" if isinstance(record, MetricRecord) else "config"
        if kind == "arrays" and not arrays_inline:
            out[name] = record
            continue
        index = len(manifest)
        if kind == "arrays":
            manifest.append([name, kind, [[key, a.dtype, list(a.shape), a.stype] for key, a in record.items()]])
            values.update({f"{index}:{key}": a.data for key, a in record.items()})
        else:
            manifest.append([name, kind])
            values.update({f"{index}:{key}": value for key, value in record.items()})
    values[BUNDLE_MANIFEST] = json.dumps(manifest)
    out[BUNDLE_RECORD] = ConfigRecord(values)
    return out


def unbundle(content: RecordDict) -> RecordDict:
    """The records `bundle` folded, restored (content that is not bundled is returned unchanged).
    Raises PackingError if the bundle does not match its manifest (it may come from another party)."""
    if not is_bundled(content):
        return content
    values = dict(content.config_records[BUNDLE_RECORD])
    try:
        manifest = json.loads(str(values.pop(BUNDLE_MANIFEST)))
    except (KeyError, json.JSONDecodeError) as exc:
        raise PackingError(f"bundle: missing or malformed '{BUNDLE_MANIFEST}' ({exc})") from None
    if not isinstance(manifest, list) or len(values) > MAX_BUNDLED_KEYS:
        raise PackingError("bundle: the manifest must list the bundled records")
    out = RecordDict({name: record for name, record in content.items() if name != BUNDLE_RECORD})
    # one pass over the values ("<index>:<key>"), so a crafted bundle with many records costs linear time
    by_index: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        index, _, own_key = key.partition(":")
        by_index.setdefault(index, {})[own_key] = value
    for index, entry in enumerate(manifest):
        name, kind, fields = _bundle_entry(entry, out)
        out[name] = _bundled_record(name, kind, fields, by_index.pop(str(index), {}))
    if by_index:
        left = sum(len(own) for own in by_index.values())
        raise PackingError(f"bundle: {left} value(s) belong to no record of the manifest")
    return out


def _bundle_entry(entry: Any, seen: RecordDict) -> tuple[str, str, Any]:
    if not isinstance(entry, list) or len(entry) not in (2, 3) or entry[1] not in _KINDS:
        raise PackingError(f"bundle: manifest entry {str(entry)[:80]!r} is not [name, kind(, arrays)]")
    name = entry[0]
    if not isinstance(name, str) or not name or name in seen or name == BUNDLE_RECORD:
        raise PackingError(f"bundle: record name {str(name)[:80]!r} is empty, repeated or reserved")
    if (entry[1] == "arrays") != (len(entry) == 3):
        raise PackingError(f"bundle: record {name!r}: only an arrays record lists its arrays")
    return name, entry[1], entry[2] if len(entry) == 3 else None


def _bundled_record(name: str, kind: str, fields: Any, own: dict[str, Any]):  # noqa: ANN202
    """One record of a bundle, rebuilt from its values (and, for arrays, their dtype/shape/stype)."""
    try:
        if kind == "config":
            return ConfigRecord(own)
        if kind == "metrics":
            return MetricRecord(own)
        if not isinstance(fields, list) or len(fields) != len(own):
            raise PackingError(f"bundle: record {name!r}: its arrays and their values do not match")
        arrays = {}
        for key, dtype, shape, stype in fields:
            data = own.get(key)
            if not isinstance(data, bytes) or not isinstance(dtype, str) or not isinstance(stype, str) \
                    or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise PackingError(f"bundle: array {name}/{key!r}: malformed")
            arrays[key] = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)
        return ArrayRecord(arrays)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, PackingError):
            raise
        raise PackingError(f"bundle: record {name!r}: {exc}") from None

"""Filtered search: a small JSON filter language, evaluated column by column over an index's stored metadata.

A filter is a JSON object. Each key is a field, or ``and`` / ``or`` / ``not``; several keys in one object must all
hold::

    {"tags": "tabby"}                                   the field equals the value (a list field: contains it)
    {"category": {"in": ["shoes", "bags"]}}             equals one of them (a list field: contains one)
    {"indexed_at": {"gte": 1764547200, "lt": 1764633600}}   a range: gt, gte, lt, lte (numbers or strings)
    {"id": {"prefix": "s3://photos/2026/"}}             a string field starts with it
    {"ne": ...}                                         not equal: {"category": {"ne": "shoes"}}
    {"and": [f, ...]}, {"or": [f, ...]}, {"not": f}

Fields: ``id``, and every key of the rows' metadata: ``tags`` (the top ImageNet labels), ``custom_tags`` (the
labels custom classifiers gave the row — every head's, those at or above their thresholds — where ``lens embed`` or
the event path ran with heads), ``uri``, ``indexed_at`` (Unix seconds, when the row was embedded), the event path's
``sequencer``, and any column carried through ``lens embed --carry``. A row without the field never matches a
condition on it (``ne`` included); ``not`` matches every row its filter does not. A field no row has, an unknown operator, a value of the wrong type, more than
:data:`MAX_CLAUSES` conditions or deeper than :data:`MAX_DEPTH` is a :class:`~lens.errors.InvalidRequestError`
(HTTP 400) naming the problem.

Evaluation is columnar (:class:`MetadataColumns`: the metadata JSON parsed once per index version by Arrow's
JSON reader, then Arrow compute kernels per filter), and gives the boolean mask of matching rows that the search
hands to FAISS as an ID selector (see :mod:`lens.index.search`).
"""

from __future__ import annotations

import io
import json
import threading
from typing import Any

import numpy as np

from lens.errors import InvalidRequestError

__all__ = ["parse_filter", "MetadataColumns", "MAX_CLAUSES", "MAX_DEPTH"]

MAX_CLAUSES = 64
MAX_DEPTH = 8
MAX_FILTER_CHARS = 8192
_RANGE = {"gt": "greater", "gte": "greater_equal", "lt": "less", "lte": "less_equal"}
_OPS = {"eq", "ne", "in", "prefix", *_RANGE}
_SCALAR = (str, int, float, bool)


def _bad(msg: str) -> InvalidRequestError:
    return InvalidRequestError(f"invalid filter: {msg}", code="invalid_filter")


def parse_filter(raw: Any) -> dict | None:
    """A filter from the API (a JSON string, a dict, or None), checked for shape: returns the normal form
    ``{"and": [...]}`` / ``{"or": [...]}`` / ``{"not": f}`` / ``{"field": name, "op": op, "value": v}``."""
    if raw is None or raw == "" or raw == {}:
        return None
    if isinstance(raw, str):
        if len(raw) > MAX_FILTER_CHARS:
            raise _bad(f"longer than {MAX_FILTER_CHARS} characters")
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise _bad(f"not JSON ({e.msg} at character {e.pos})") from e
    count = [0]
    node = _node(raw, 0, count)
    return node


def _node(f: Any, depth: int, count: list[int]) -> dict:
    if depth > MAX_DEPTH:
        raise _bad(f"nested deeper than {MAX_DEPTH}")
    if not isinstance(f, dict) or not f:
        raise _bad(f"expected a non-empty JSON object, got {json.dumps(f)[:80]}")
    parts = []
    for key, val in f.items():
        if key in ("and", "or"):
            if not isinstance(val, list) or not val:
                raise _bad(f"'{key}' takes a non-empty list of filters")
            parts.append({key: [_node(x, depth + 1, count) for x in val]})
        elif key == "not":
            parts.append({"not": _node(val, depth + 1, count)})
        else:
            parts += _conditions(key, val, count)
    return parts[0] if len(parts) == 1 else {"and": parts}


def _conditions(field: str, val: Any, count: list[int]) -> list[dict]:
    if not isinstance(field, str) or not field or len(field) > 200:
        raise _bad("a field name must be a non-empty string")
    ops = val if isinstance(val, dict) else {"eq": val}
    if not ops:
        raise _bad(f"no condition on '{field}'")
    out = []
    for op, v in ops.items():
        count[0] += 1
        if count[0] > MAX_CLAUSES:
            raise _bad(f"more than {MAX_CLAUSES} conditions")
        if op not in _OPS:
            raise _bad(f"unknown operator '{op}' on '{field}' (known: {', '.join(sorted(_OPS))})")
        if op == "in":
            if not isinstance(v, list) or not v or not all(isinstance(x, _SCALAR) for x in v) or len(v) > 1000:
                raise _bad(f"'in' on '{field}' takes a list of 1 to 1000 strings or numbers")
        elif op == "prefix":
            if not isinstance(v, str):
                raise _bad(f"'prefix' on '{field}' takes a string")
        elif op in _RANGE:
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                raise _bad(f"'{op}' on '{field}' takes a number or a string")
        elif not isinstance(v, _SCALAR):
            raise _bad(f"'{op}' on '{field}' takes a string, number or boolean, got {json.dumps(v)[:80]}")
        out.append({"field": field, "op": op, "value": v})
    return out


def fields_of(node: dict) -> set[str]:
    if "field" in node:
        return {node["field"]}
    if "not" in node:
        return fields_of(node["not"])
    return set().union(*(fields_of(x) for x in next(iter(node.values()))))


class MetadataColumns:
    """Rows' ids and metadata as Arrow columns, parsed once (thread-safe, lazily); :meth:`mask` evaluates a filter."""

    def __init__(self, ids: list[str], metadata: list[str]) -> None:
        self._ids, self._metadata = ids, metadata
        self._lock = threading.Lock()
        self._table = None

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def table(self):
        if self._table is None:
            with self._lock:
                if self._table is None:
                    self._table = _parse(self._ids, self._metadata)
        return self._table

    def fields(self) -> set[str]:
        return set(self.table.column_names)

    def mask(self, node: dict, *, known: set[str] | None = None) -> np.ndarray:
        """Boolean mask of the rows ``node`` (from :func:`parse_filter`) matches. ``known``: field names that exist
        somewhere (else this table's own); a field outside them is a 400."""
        names = set(self.table.column_names)
        unknown = fields_of(node) - (known if known is not None else names)
        if unknown:
            raise _bad(f"no item has the field {', '.join(repr(u) for u in sorted(unknown))} (fields: "
                       f"{', '.join(sorted(known if known is not None else names))})")
        if len(self) == 0:
            return np.zeros(0, bool)
        return np.asarray(self._eval(node).to_numpy(zero_copy_only=False), bool)

    def _eval(self, node: dict):
        import pyarrow as pa
        import pyarrow.compute as pc

        if "and" in node or "or" in node:
            op, parts = ("and", node["and"]) if "and" in node else ("or", node["or"])
            out = self._eval(parts[0])
            for p in parts[1:]:
                out = (pc.and_ if op == "and" else pc.or_)(out, self._eval(p))
            return out
        if "not" in node:
            return pc.invert(self._eval(node["not"]))
        if node["field"] not in self.table.column_names:
            return pa.array(np.zeros(len(self), bool))
        col = self.table.column(node["field"]).combine_chunks()
        return _condition(col, node["op"], node["value"], len(self))


def _condition(col, op: str, value, n: int):
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):  # a list field: does any element match?
        if op not in ("eq", "in"):
            raise _bad(f"'{op}' does not apply to a list field (use a value or 'in')")
        flat = col.flatten()
        hit = _condition(flat, op, value, len(flat))
        parents = pc.list_parent_indices(col).to_numpy()
        out = np.zeros(n, bool)
        out[parents[np.asarray(hit.to_numpy(zero_copy_only=False), bool)]] = True
        return pa.array(out)
    try:
        if op == "prefix":
            if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
                raise _bad(f"'prefix' applies to text fields; this field is {col.type}")
            res = pc.starts_with(col, value)
        elif op == "in":
            res = pc.is_in(col, value_set=_values(col.type, value))
        else:
            v = _scalar(col.type, value, op)
            fn = {"eq": "equal", "ne": "not_equal", **_RANGE}[op]
            res = getattr(pc, fn)(col, v)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        raise _bad(f"{op} {json.dumps(value)[:80]} does not apply to a field of type {col.type}: "
                   f"{str(e).splitlines()[0][:160]}") from e
    return pc.fill_null(res, False)  # a row without the field never matches


def _scalar(t, value, op: str):
    import pyarrow as pa

    if pa.types.is_floating(t) or pa.types.is_integer(t):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(f"'{op}' on a numeric field takes a number, got {json.dumps(value)[:80]}")
        return pa.scalar(float(value), pa.float64())
    if pa.types.is_boolean(t):
        if not isinstance(value, bool):
            raise _bad(f"'{op}' on a boolean field takes true or false")
        return pa.scalar(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and pa.types.is_string(t):
        return pa.scalar(str(value))  # carried columns are stored as text
    return pa.scalar(value)


def _values(t, values: list):
    import pyarrow as pa

    if pa.types.is_floating(t) or pa.types.is_integer(t):
        return pa.array([float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)],
                        pa.float64()).cast(t)
    return pa.array([str(v) if not isinstance(v, bool) else v for v in values]).cast(t)


def _parse(ids: list[str], metadata: list[str]):
    """One Arrow table: ``id`` plus a column per metadata key (Arrow's JSON reader infers the types)."""
    import pyarrow as pa
    import pyarrow.json as pj

    if not ids:
        return pa.table({"id": pa.array([], pa.string())})
    body = "\n".join(m if m and m.startswith("{") else "{}" for m in metadata).encode()
    try:
        t = pj.read_json(io.BytesIO(body), read_options=pj.ReadOptions(block_size=1 << 26))
    except pa.ArrowInvalid:  # mixed types in one key across rows: every value as text, lists kept
        rows = [json.loads(m or "{}") for m in metadata]
        keys = sorted({k for r in rows for k in r})
        t = pa.table({k: pa.array([_text(r.get(k)) for r in rows]) for k in keys})
    if t.num_rows != len(ids):  # empty metadata objects give no row to the reader only in odd cases
        raise ValueError(f"metadata parse gave {t.num_rows} rows for {len(ids)} ids")
    if "id" in t.column_names:
        t = t.drop(["id"])
    return t.append_column("id", pa.array(ids, pa.string()))


def _text(v):
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list):
        return json.dumps(v)
    return str(v)

"""Serializers: JSON compatible with kombu's (type tags included), pickle only on request.

kombu's JSON writes a few Python types as ``{"__type__": tag, "__value__": v}``
(datetime, date, time, decimal, uuid, bytes and base64 for bytes that are not
UTF-8) and turns tuples into lists.  celeriac writes and reads the same tags, so
arguments and results cross between Celery and celeriac unchanged.
"""

from __future__ import annotations

import base64
import json
import pickle
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

from .exceptions import ContentDisallowed, DecodeError, EncodeError


def _tag(name: str, value: Any) -> dict[str, Any]:
    return {"__type__": name, "__value__": value}


def _json_default(o: Any) -> Any:
    reducer = getattr(o, "__json__", None)
    if reducer is not None:
        return reducer()
    if isinstance(o, datetime):
        return _tag("datetime", o.isoformat())
    if isinstance(o, date):
        return _tag("date", o.isoformat())
    if isinstance(o, time):
        return _tag("time", o.isoformat())
    if isinstance(o, Decimal):
        return _tag("decimal", str(o))
    if isinstance(o, uuid.UUID):
        return _tag("uuid", {"hex": o.hex})
    if isinstance(o, bytes):
        try:
            return _tag("bytes", o.decode("utf-8"))
        except UnicodeDecodeError:
            return _tag("base64", base64.b64encode(o).decode("ascii"))
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "datetime": datetime.fromisoformat,
    "date": lambda v: datetime.fromisoformat(v).date(),
    "time": time.fromisoformat,
    "decimal": Decimal,
    "uuid": lambda v: uuid.UUID(**v),
    "bytes": lambda v: v.encode("utf-8"),
    "base64": lambda v: base64.b64decode(v.encode("ascii")),
}


def _json_object_hook(o: dict[str, Any]) -> Any:
    if len(o) == 2 and "__type__" in o and "__value__" in o:
        decoder = _DECODERS.get(o["__type__"])
        if decoder is None:
            raise DecodeError(f"unsupported JSON type tag {o['__type__']!r}")
        return decoder(o["__value__"])
    return o


_encoder = json.JSONEncoder(default=_json_default)


def json_dumps(obj: Any) -> bytes:
    """Encode as kombu does (same separators, same tags)."""
    return _encoder.encode(obj).encode("utf-8")


def json_loads(data: bytes | str) -> Any:
    if isinstance(data, bytes | bytearray | memoryview):
        data = bytes(data).decode("utf-8")
    if "__type__" in data:
        return json.loads(data, object_hook=_json_object_hook)
    return json.loads(data)


def json_dumps_lenient(obj: Any) -> str:
    """JSON for inspection-only data (history meta): unknown types become their repr."""

    def default(o: Any) -> Any:
        try:
            return _json_default(o)
        except TypeError:
            return repr(o)

    try:
        return json.dumps(obj, default=default)
    except (TypeError, ValueError, RecursionError):  # e.g. keys that are not strings
        return json.dumps(repr(obj))


@dataclass(frozen=True)
class Serializer:
    name: str
    content_type: str
    content_encoding: str
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes], Any]


SERIALIZERS: dict[str, Serializer] = {
    "json": Serializer("json", "application/json", "utf-8", json_dumps, json_loads),
    "pickle": Serializer(
        "pickle", "application/x-python-serialize", "binary",
        lambda o: pickle.dumps(o, protocol=4), pickle.loads,
    ),
}
_BY_CONTENT_TYPE = {s.content_type: s for s in SERIALIZERS.values()}


def get_serializer(name: str) -> Serializer:
    try:
        return SERIALIZERS[name]
    except KeyError:
        try:
            return _BY_CONTENT_TYPE[name]
        except KeyError:
            raise EncodeError(
                f"unknown serializer {name!r}; choose one of {sorted(SERIALIZERS)}"
            ) from None


def accepted_content_types(accept: Iterable[str]) -> frozenset[str]:
    """Turn ``accept_content`` (names or content types) into content types."""
    return frozenset(get_serializer(a).content_type for a in accept)


def dumps(obj: Any, serializer: str) -> tuple[str, str, bytes]:
    """Encode ``obj``; returns (content_type, content_encoding, bytes)."""
    s = get_serializer(serializer)
    try:
        return s.content_type, s.content_encoding, s.dumps(obj)
    except Exception as exc:  # TypeError, ValueError, RecursionError, PicklingError...
        raise EncodeError(f"cannot serialize with {s.name}: {exc}") from exc


def loads(data: bytes, content_type: str, accept: frozenset[str]) -> Any:
    """Decode ``data``, refusing content types that are not accepted."""
    if content_type not in accept:
        raise ContentDisallowed(
            f"refusing to deserialize content of type {content_type!r} "
            f"(accept_content allows {sorted(accept)})"
        )
    s = _BY_CONTENT_TYPE.get(content_type)
    if s is None:
        raise DecodeError(f"no serializer for content type {content_type!r}")
    try:
        return s.loads(data)
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"cannot decode {content_type} content: {exc}") from exc

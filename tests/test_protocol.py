"""Wire and storage formats, checked against the real Celery 5.7 / kombu 5.7 packages."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time
from decimal import Decimal

import celery
import pytest
from kombu.utils import json as kjson

from celeriac import Celery
from celeriac.exceptions import EncodeError, NotRegistered, SecurityError
from celeriac.protocol import (
    build_task_message,
    decode_envelope,
    encode_envelope,
    exception_from_dict,
    exception_to_dict,
    new_id,
    parse_task_message,
)
from celeriac.serialization import accepted_content_types, json_dumps, json_loads

SAMPLE = {
    "when": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
    "day": date(2024, 1, 2),
    "at": time(3, 4, 5),
    "price": Decimal("1.10"),
    "uid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "text_bytes": b"hello",
    "raw_bytes": b"\xff\x00",
    "tuple": (1, 2),
    "nested": [{"a": None, "b": 1.5, "c": "é"}],
}


def test_json_matches_kombu_byte_for_byte():
    assert json_dumps(SAMPLE) == kjson.dumps(SAMPLE).encode()
    assert json_loads(kjson.dumps(SAMPLE)) == kjson.loads(kjson.dumps(SAMPLE))
    assert kjson.loads(json_dumps(SAMPLE)) == json_loads(json_dumps(SAMPLE))


def test_message_headers_and_body_match_celery():
    capp = celery.Celery("c", broker="memory://")
    tid = new_id()
    ours = build_task_message("tasks.add", (2, 3), {"z": 1}, task_id=tid, queue="celery",
                              serializer="json")
    theirs = capp.amqp.as_task_v2(tid, "tasks.add", args=(2, 3), kwargs={"z": 1})
    assert list(ours.headers) == list(theirs.headers)
    for key in ("lang", "task", "id", "root_id", "parent_id", "retries", "timelimit", "eta",
                "expires", "group", "ignore_result", "argsrepr", "kwargsrepr"):
        assert ours.headers[key] == theirs.headers[key], key
    assert ours.body == kjson.dumps(theirs.body).encode()
    # a Celery-built message parses in celeriac
    body = kjson.dumps(theirs.body).encode()
    from celeriac.protocol import Message

    call = parse_task_message(Message(theirs.headers, body, "application/json", "utf-8"),
                              accepted_content_types(["json"]))
    assert (call.id, call.name, call.args, call.kwargs) == (tid, "tasks.add", [2, 3], {"z": 1})


def test_envelope_round_trip_is_kombus_layout():
    m = build_task_message("t.x", [1], {}, task_id=new_id(), queue="q", serializer="json")
    raw = encode_envelope(m)
    env = kjson.loads(raw)
    assert set(env) == {"body", "content-encoding", "content-type", "headers", "properties"}
    assert env["properties"]["body_encoding"] == "base64"
    assert env["properties"]["delivery_info"] == {"exchange": "", "routing_key": "q"}
    back = decode_envelope(raw, "q")
    assert back.body == m.body and back.headers == m.headers


def test_unserializable_argument_is_named_at_delay():
    app = Celery("t", broker="memory://serial")

    @app.task
    def f(a, b=None):
        return a

    with pytest.raises(EncodeError, match=r"argument 0 of task .*f \(<object object"):
        f.delay(object())
    with pytest.raises(EncodeError, match=r"keyword argument 'b'.*type set"):
        f.delay(1, b={1, 2})


@pytest.mark.parametrize("exc", [ValueError("bad value", 7), KeyError("k"),
                                 NotRegistered("x.y"), OSError(2, "nope")])
def test_exceptions_cross_between_celery_and_celeriac(exc):
    capp = celery.Celery("c", backend="cache+memory://")
    ours = exception_to_dict(exc)
    theirs = kjson.loads(kjson.dumps(capp.backend.prepare_exception(exc)))  # as stored
    if isinstance(exc, NotRegistered):
        assert ours["exc_module"] == "celery.exceptions"
        assert type(capp.backend.exception_to_python(ours)).__name__ == "NotRegistered"
    else:
        assert ours == theirs
        back = capp.backend.exception_to_python(ours)
        assert type(back) is type(exc) and back.args == exc.args
    rebuilt = exception_from_dict(theirs if not isinstance(exc, NotRegistered) else ours)
    assert type(rebuilt) is type(exc) and rebuilt.args == exc.args


def test_unknown_exception_class_is_synthesized_never_unpickled():
    e = exception_from_dict({"exc_type": "Weird", "exc_message": ["m"],
                             "exc_module": "no_such_module_xyz"})
    assert type(e).__name__ == "Weird" and isinstance(e, Exception) and e.args == ("m",)
    with pytest.raises(SecurityError):
        exception_from_dict({"exc_type": "system", "exc_message": ["echo hi"],
                             "exc_module": "os"})


@pytest.mark.parametrize("zone", [None, "Asia/Tokyo", "America/New_York"])
@pytest.mark.parametrize("value", ["2030-01-01T12:00:00", "2030-07-01T12:00:00.250000",
                                   "2030-01-01T12:00:00+09:00", "2030-01-01T12:00:00-05:00"])
def test_eta_and_expires_read_as_celery_reads_them(zone, value):
    """Naive or not, whatever the app's time zone: the same instant as Celery's worker."""
    from celery.utils.time import maybe_iso8601, maybe_make_aware

    from celeriac.protocol import aware_time

    theirs = maybe_make_aware(maybe_iso8601(value), zone)
    assert aware_time(value) == theirs and aware_time(value).utcoffset() is not None

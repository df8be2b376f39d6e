"""``apply_async`` options: the ones celeriac implements work (custom ``headers`` reach the
task's ``self.request`` as in Celery), any other warns once instead of vanishing."""

from __future__ import annotations

import importlib
import json
import warnings

import celery
import pytest
import redis

from celeriac import Celery
from celeriac.conf import _warned

from .conftest import CeleryWorker, Worker, write_module


@pytest.fixture
def caught():
    _warned.clear()
    with warnings.catch_warnings(record=True) as found:
        warnings.simplefilter("always")
        yield found


def _messages(found) -> list[str]:
    return [str(w.message) for w in found]


def test_unsupported_and_misspelt_options_warn_once(caught):
    app = Celery("opts", broker="memory://opts-warn")

    @app.task
    def f(x):
        return x

    f.apply_async((1,), link="sig", link_error="sig", routing_key="rk", exchange="ex",
                  countdwn=5, compression="zlib", zzzzqqq=1)
    messages = _messages(caught)
    assert len(messages) == 7, messages
    assert all(w.filename == __file__ for w in caught)  # points at the caller
    text = "\n".join(messages)
    assert "option 'link' is not supported yet: callbacks and error callbacks are not run" \
        in text
    assert "option 'link_error' is not supported yet" in text
    assert "option 'routing_key' is not supported: celeriac routes by queue name" in text
    assert "option 'exchange' is not supported" in text
    assert "unknown apply_async option 'countdwn' (did you mean 'countdown'?)" in text
    assert "option 'compression' is a Celery option celeriac does not implement" in text
    assert "unknown apply_async option 'zzzzqqq': neither celeriac nor Celery" in text
    # once per name
    f.apply_async((1,), countdwn=5, link="sig")
    app.send_task("elsewhere.t", link="sig", routing_key="x")
    assert len(caught) == 7
    # send_task warns the same way
    app.send_task("elsewhere.t", retry_policy={})
    assert "option 'retry_policy' is a Celery option" in str(caught[-1].message)


def test_implemented_options_do_not_warn(caught):
    app = Celery("opts", broker="memory://opts-quiet")

    @app.task
    def f(x):
        return x

    f.apply_async((1,), task_id="quiet-1", queue="q", countdown=1, expires=60, priority=3,
                  serializer="json", ignore_result=False, time_limit=5, soft_time_limit=4,
                  headers={"tenant": "acme"}, shadow="nice-name")
    app.send_task("elsewhere.t", headers={"k": 1}, shadow="s")
    assert _messages(caught) == []


def test_eager_mode_keeps_headers_and_warns_too(caught):
    app = Celery("opts", broker="memory://opts-eager", task_always_eager=True)

    @app.task(bind=True)
    def who(self):
        return self.request.headers, getattr(self.request, "tenant", None)

    r = who.apply_async(headers={"tenant": "acme"}, link="sig")
    assert r.get() == ({"tenant": "acme"}, "acme")
    assert any("option 'link' is not supported yet" in m for m in _messages(caught))
    assert who.apply().get() == (None, None)  # no custom headers: None, as in Celery


def test_queue_given_as_a_kombu_queue_is_its_name(caught):
    from kombu import Queue

    app = Celery("opts", broker="memory://opts-queue", task_routes={"*": {"queue": "routed"}})

    @app.task
    def f():
        pass

    assert f.apply_async(queue=Queue("other")).history[0]["meta"]["queue"] == "other"
    assert f.apply_async().history[0]["meta"]["queue"] == "routed"
    assert _messages(caught) == []


def test_custom_headers_may_not_replace_the_protocols():
    app = Celery("opts", broker="memory://opts-clash")

    @app.task
    def f():
        pass

    with pytest.raises(ValueError, match=r"custom headers \['id', 'retries'\]"):
        f.apply_async(headers={"id": "forged", "retries": 9, "fine": 1})


TASKS = """
import os
from celeriac import Celery

app = Celery('hdrs', broker=os.environ['TEST_BROKER'], backend=os.environ['TEST_BROKER'])

@app.task(bind=True, name='hdrs.show')
def show(self):
    return {'headers': self.request.headers,
            'tenant': getattr(self.request, 'tenant', None)}
"""

CELERY_TASKS = TASKS.replace("from celeriac import", "from celery import").replace(
    "Celery('hdrs'", "Celery('chdrs'")


@pytest.mark.server
def test_custom_headers_reach_the_task_as_in_celery(project, workers, redis_url,
                                                    monkeypatch):
    """celeriac -> celeriac, Celery -> celeriac and celeriac -> Celery 5.7: the task sees
    the custom headers in ``self.request.headers`` and as attributes, the same each way."""
    monkeypatch.setenv("TEST_BROKER", redis_url)
    write_module(project, "hdrs", TASKS)
    hdrs = importlib.import_module("hdrs")
    client = redis.Redis.from_url(redis_url)

    sent = hdrs.app.send_task("hdrs.show", headers={"tenant": "acme", "trace": [1, 2]},
                              shadow="shown-as")
    raw = json.loads(client.lindex("celery", 0))
    assert raw["headers"]["tenant"] == "acme" and raw["headers"]["shadow"] == "shown-as"
    expected = {"headers": {"tenant": "acme", "trace": [1, 2]}, "tenant": "acme"}
    plain = hdrs.show.delay()

    workers.append(Worker(project, "hdrs"))
    assert sent.get(timeout=60) == expected
    assert plain.get(timeout=60) == {"headers": None, "tenant": None}
    producer = celery.Celery("producer", broker=redis_url, backend=redis_url)
    from_celery = producer.send_task("hdrs.show", headers={"tenant": "acme", "trace": [1, 2]})
    assert hdrs.app.AsyncResult(from_celery.id).get(timeout=60) == expected
    workers.pop().stop()

    write_module(project, "chdrs", CELERY_TASKS)
    workers.append(CeleryWorker(project, "chdrs"))
    to_celery = hdrs.app.send_task("hdrs.show", headers={"tenant": "acme", "trace": [1, 2]})
    assert to_celery.get(timeout=60) == expected

"""The app: settings, defaults, task naming, eager mode, AsyncResult identity."""

from __future__ import annotations

import importlib
import time
import warnings

import pytest

from celeriac import AsyncResult, Celery, states
from celeriac.conf import _warned
from celeriac.exceptions import ContentDisallowed

from .conftest import Worker, write_module


def test_celery_setting_names_and_unknown_warnings():
    _warned.clear()
    app = Celery("t", broker="memory://", task_track_started=True)
    assert app.conf.task_track_started is True
    assert app.conf.task_default_queue == "celery" and app.conf.worker_prefetch_multiplier == 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        app.conf.update(worker_max_tasks_per_child=10, totally_made_up=1)
        app.conf.update(totally_made_up=2)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "'worker_max_tasks_per_child' is a Celery setting celeriac does not implement" \
        in messages[0]
    assert "unknown setting 'totally_made_up'" in messages[1]


def test_mutable_defaults_are_not_shared_between_apps():
    from celeriac.conf import DEFAULTS

    one, two = Celery("one", broker="memory://"), Celery("two", broker="memory://")
    one.conf.broker_transport_options["visibility_timeout"] = 5
    one.conf.task_publish_retry_policy["max_retries"] = 0
    one.conf.result_backend_transport_options["global_keyprefix"] = "one:"
    assert two.conf.broker_transport_options == {}
    assert two.conf.task_publish_retry_policy["max_retries"] == 3
    assert two.conf.result_backend_transport_options == {}
    assert Celery("three", broker="memory://").conf.broker_transport_options == {}
    assert DEFAULTS["broker_transport_options"] == {}


def test_config_from_object_with_namespace(project):
    write_module(project, "settings", """
        CELERY_BROKER_URL = 'memory://ns'
        CELERY_TASK_ALWAYS_EAGER = True
        OTHER = 1
    """)
    app = Celery("t")
    app.config_from_object("settings", namespace="CELERY")
    assert app.conf.broker_url == "memory://ns" and app.conf.task_always_eager is True
    assert "other" not in app.conf


def test_default_broker_and_backend_rule(project, monkeypatch):
    app = Celery("t")
    assert app.broker_url == "sqlite:///celeriac.db"
    assert app.result_backend_url == "sqlite:///celeriac.db"
    assert Celery("t", broker="memory://x").result_backend_url == "memory://"
    file_app = Celery("t", backend="file:///tmp/x")
    assert file_app.result_backend_url == "file:///tmp/x"
    monkeypatch.setenv("CELERY_BROKER_URL", "sqlite:///other.db")
    assert Celery("t", broker="sqlite:///ignored.db").broker_url == "sqlite:///other.db"


def test_task_names_follow_celery():
    app = Celery("proj", broker="memory://")

    @app.task
    def plain():
        pass

    @app.task(name="custom.name")
    def named():
        pass

    assert plain.name == f"{__name__}.plain"
    assert named.name == "custom.name" and app.tasks["custom.name"] is named
    assert app.gen_task_name("f", "__main__") == "proj.f"
    with pytest.raises(TypeError, match="unknown task option 'retry_forever'"):
        app.task(retry_forever=True)(lambda: None)


def test_calling_a_task_runs_it_inline_and_eager_mode():
    app = Celery("t", broker="memory://", task_always_eager=True)

    @app.task(bind=True)
    def mul(self, x, y):
        self.update_state(state="HALFWAY", meta={"x": x})
        return x * y

    @app.task
    async def amul(x, y):
        return x * y

    assert mul(3, 4) == 12
    r = mul.delay(3, 4)
    assert r.get() == 12 and r.state == states.SUCCESS and r.successful()
    assert [h["state"] for h in r.history] == ["PENDING", "STARTED", "HALFWAY", "SUCCESS"]
    assert amul.delay(2, 5).get() == 10
    bad = mul.delay(1, None)
    assert bad.state == states.FAILURE and isinstance(bad.result, TypeError)
    with pytest.raises(TypeError):
        bad.get()


def test_get_inside_a_task_is_refused():
    app = Celery("t", broker="memory://", task_always_eager=True)

    @app.task
    def waits():
        return AsyncResult("some-id", app=app).get(timeout=1)

    r = waits.delay()
    assert r.state == states.FAILURE and isinstance(r.result, RuntimeError)
    assert "Never call result.get() within a task" in str(r.result)


def test_async_result_identity():
    app = Celery("t", broker="memory://")
    r = app.AsyncResult("abc-1")
    assert repr(r) == "<AsyncResult: abc-1>" and str(r) == "abc-1"
    assert r == "abc-1" and r == AsyncResult("abc-1", app=app) and r != "abc-2"
    assert len({r, AsyncResult("abc-1", app=app)}) == 1


def test_pickle_only_when_accepted(project, workers):
    write_module(project, "ptasks", """
        from celeriac import Celery
        app = Celery('ptasks')

        @app.task
        def echo(x):
            return x
    """)
    mod = importlib.import_module("ptasks")
    workers.append(Worker(project, "ptasks", concurrency=1))
    r = mod.echo.apply_async(({1, 2},), serializer="pickle")
    with pytest.raises(ContentDisallowed, match="application/x-python-serialize"):
        r.get(timeout=10)
    assert mod.echo.delay(5).get(timeout=10) == 5


def test_memory_broker_with_an_in_process_worker():
    from celeriac.testing import start_worker

    app = Celery("mem", broker="memory://in-process-test")

    @app.task(bind=True)
    def add(self, x, y):
        self.update_state(state="ADDING")
        return x + y

    @app.task
    async def aadd(x, y):
        return x + y

    pending = add.delay(1, 1)
    with start_worker(app):
        assert add.delay(2, 3).get(timeout=5) == 5
        assert aadd.delay(4, 4).get(timeout=5) == 8
        assert pending.get(timeout=5) == 2
    assert [h["state"] for h in pending.history] == ["PENDING", "RECEIVED", "ADDING", "SUCCESS"]
    after = add.delay(0, 0)
    time.sleep(0.3)
    assert after.state == states.PENDING  # no worker any more: it waits


def test_apply_async_options_and_unsafe_ids():
    from celeriac.exceptions import UnsafeTaskId

    app = Celery("opts", broker="memory://opts")

    @app.task
    def f(x):
        return x

    r = f.apply_async((1,), task_id="order-17", queue="other")
    assert r.id == "order-17" and r.exists()
    assert r.history[0]["meta"] == {"task": f.name, "queue": "other"}
    with pytest.raises(UnsafeTaskId, match="not safe as a storage key"):
        f.apply_async((1,), task_id="../../etc/passwd")
    s = app.send_task("elsewhere.task", (1, 2), task_id="sent-1")
    assert s.id == "sent-1" and s.state == states.PENDING and s.exists()


def test_one_failing_write_does_not_hold_back_the_others():
    """The store refuses one record for good: only that write fails (the task calling
    update_state sees the error); other tasks' results are written at once."""
    from celeriac.backends.memory import MemoryBackend
    from celeriac.testing import start_worker

    class Refusing(MemoryBackend):
        def record(self, records):
            if any(r.task_id == "refused-1" for r in records):
                raise ValueError("this store refuses refused-1")
            return super().record(records)

    app = Celery("w", broker="memory://refusing")
    app._backend = Refusing(app, "memory://refusing")

    @app.task(bind=True)
    def reports(self):
        self.update_state(task_id="refused-1", state="PROGRESS")

    @app.task
    def ok(x):
        return x

    with start_worker(app):
        bad = reports.delay()
        goods = [ok.delay(i) for i in range(5)]
        assert [g.get(timeout=30) for g in goods] == list(range(5))
        with pytest.raises(ValueError, match="refuses refused-1"):
            bad.get(timeout=5)


def test_task_routes_and_queues_as_celery_reads_them():
    from kombu import Exchange, Queue

    app = Celery("routes", broker="memory://routes", task_routes={
        "routes.feeds.*": {"queue": "feeds", "priority": 3},
        "routes.exact": "exactq",
    })
    for name in ("feeds.fetch", "exact", "other"):
        app.task(name=f"routes.{name}")(lambda: None)

    def q(name, **kw):
        return app.tasks[name].apply_async(**kw).history[0]["meta"]["queue"]

    assert q("routes.feeds.fetch") == "feeds"
    assert q("routes.exact") == "exactq"
    assert q("routes.other") == "celery"
    assert q("routes.exact", queue="explicit") == "explicit"  # apply_async wins

    app.conf.task_routes = [lambda name, *a, **kw: "fn" if name.endswith("other") else None]
    assert q("routes.other") == "fn" and q("routes.exact") == "celery"

    app.conf.task_queues = [Queue("high", Exchange("high"), routing_key="hi",
                                  queue_arguments={"x-max-priority": 10}), "low"]
    assert app.default_queues() == ["high", "low"]
    spec = app.queue_spec("high")
    assert (spec.exchange, spec.routing_key, spec.arguments) == (
        "high", "hi", {"x-max-priority": 10})
    assert app.queue_spec("low").exchange == "low"

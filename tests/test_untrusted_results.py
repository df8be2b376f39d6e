"""Stored results are untrusted: reading one never imports a module because the store names
it, a BaseException-only class comes back as an ordinary error, and the classes made up
for unknown names stay bounded."""

from __future__ import annotations

import builtins
import gc
import json
import subprocess
import sys
import textwrap
import weakref

import pytest

from celeriac import Celery, states
from celeriac.protocol import SYNTHESIZED_CACHE_SIZE, _synthesize, exception_from_dict, new_id

from .conftest import ROOT, Worker, write_module


def _store_failure(directory, task_id: str, exc: dict) -> None:
    """A FAILURE meta written straight into a file result store, as anyone with write
    access to the store could write it."""
    meta = {"status": states.FAILURE, "result": exc, "traceback": None, "children": [],
            "date_done": "2026-01-01T00:00:00+00:00", "task_id": task_id}
    (directory / f"celery-task-meta-{task_id}").write_text(json.dumps(meta))


def test_stored_module_name_is_never_imported(project):
    """``celeriac.__main__`` (which runs the CLI when imported) and a module of a package
    the reader has loaded (which writes a file when imported) stay unimported."""
    results = project / "results"
    results.mkdir()
    (project / "loadedpkg").mkdir()
    (project / "loadedpkg" / "__init__.py").write_text("")
    (project / "loadedpkg" / "boom.py").write_text(
        "import pathlib\npathlib.Path('imported.txt').write_text('ran')\n"
        "class Boom(Exception):\n    pass\n")
    _store_failure(results, "via-main", {"exc_type": "Main", "exc_message": ["x"],
                                         "exc_module": "celeriac.__main__"})
    _store_failure(results, "via-pkg", {"exc_type": "Boom", "exc_message": ["y"],
                                        "exc_module": "loadedpkg.boom"})
    script = textwrap.dedent(f"""
        import sys
        import loadedpkg
        from celeriac import Celery
        app = Celery('reader', broker='memory://', backend='file://{results}')
        for tid in ('via-main', 'via-pkg'):
            try:
                app.AsyncResult(tid).get(timeout=5)
            except Exception as exc:
                print(tid, type(exc).__module__, type(exc).__name__, exc.args)
        print('loaded:', 'celeriac.__main__' in sys.modules, 'loadedpkg.boom' in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=project, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": f"{project}:{ROOT}"})
    assert out.returncode == 0, out.stderr
    assert "via-main celeriac.__main__ Main ('x',)" in out.stdout, out.stdout
    assert "via-pkg loadedpkg.boom Boom ('y',)" in out.stdout, out.stdout
    assert "loaded: False False" in out.stdout
    assert not (project / "imported.txt").exists()


def test_lookup_runs_no_module_getattr(project):
    """A loaded module's ``__getattr__`` (lazy loaders import on attribute access) is not
    run to find a stored class name."""
    write_module(project, "lazymod", """
        import pathlib

        def __getattr__(name):
            pathlib.Path('touched.txt').write_text(name)
            raise AttributeError(name)
    """)
    import lazymod  # noqa: F401 - loaded, as an application's module would be

    exc = exception_from_dict({"exc_type": "Lazy", "exc_message": ["z"],
                               "exc_module": "lazymod"})
    assert type(exc).__name__ == "Lazy" and exc.args == ("z",)
    assert not (project / "touched.txt").exists()


@pytest.mark.parametrize("name", ["SystemExit", "KeyboardInterrupt", "GeneratorExit"])
def test_base_exception_only_result_is_an_ordinary_error(project, name):
    results = project / "results"
    results.mkdir()
    app = Celery("reader", broker="memory://", backend=f"file://{results}")
    _store_failure(results, "base-1", {"exc_type": name, "exc_message": [3],
                                       "exc_module": "builtins"})
    with pytest.raises(Exception) as info:  # noqa: PT011 - the point: it IS an Exception
        app.AsyncResult("base-1").get(timeout=5)
    exc = info.value
    assert type(exc).__name__ == name and type(exc).__module__ == "builtins"
    assert exc.args == (3,) and not isinstance(exc, getattr(builtins, name))
    # an ordinary exception class of the same module is still the real one
    _store_failure(results, "plain-1", {"exc_type": "ValueError", "exc_message": ["v"],
                                        "exc_module": "builtins"})
    with pytest.raises(ValueError, match="v"):
        app.AsyncResult("plain-1").get(timeout=5)


def test_custom_base_exception_subclass_is_rebuilt_as_exception():
    class Halt(BaseException):
        pass

    data = {"exc_type": Halt.__qualname__, "exc_message": ["stop"],
            "exc_module": __name__}
    # nested in a function: not reachable as a module attribute -> synthesized anyway
    exc = exception_from_dict(data)
    assert isinstance(exc, Exception) and exc.args == ("stop",)
    exc = exception_from_dict(Halt("live"))  # a live one handed over as it is
    assert isinstance(exc, Exception) and type(exc).__name__ == "Halt"


class ModuleLevelHalt(BaseException):
    pass


def test_loaded_base_exception_class_is_rebuilt_as_exception():
    exc = exception_from_dict({"exc_type": "ModuleLevelHalt", "exc_message": ["m"],
                               "exc_module": __name__})
    assert isinstance(exc, Exception) and not isinstance(exc, ModuleLevelHalt)
    assert (type(exc).__module__, type(exc).__qualname__, exc.args) == (
        __name__, "ModuleLevelHalt", ("m",))


def test_synthesized_classes_stay_bounded():
    first = type(exception_from_dict({"exc_type": f"Flood{new_id()}", "exc_message": [],
                                      "exc_module": "nowhere_at_all"}))
    ref = weakref.ref(first)
    del first
    for i in range(SYNTHESIZED_CACHE_SIZE * 4):
        exception_from_dict({"exc_type": f"Flood{i}", "exc_message": [i],
                             "exc_module": "nowhere_at_all"})
    gc.collect()
    assert ref() is None  # the oldest was dropped
    assert _synthesize.cache_info().currsize <= SYNTHESIZED_CACHE_SIZE


TASKS = """
from celeriac import Celery

app = Celery('exits')

@app.task
def exits(code):
    raise SystemExit(code)

@app.task
def interrupted():
    raise KeyboardInterrupt('stop')

@app.task
def add(x, y):
    return x + y
"""


def test_task_raising_system_exit_fails_as_an_ordinary_error(project, workers):
    write_module(project, "exits", TASKS)
    import exits

    w = Worker(project, "exits")
    workers.append(w)
    r = exits.exits.delay(4)
    with pytest.raises(Exception) as info:  # noqa: PT011 - the point: it IS an Exception
        r.get(timeout=60)
    assert type(info.value).__name__ == "SystemExit" and info.value.args == (4,)
    assert r.state == states.FAILURE
    k = exits.interrupted.delay()
    with pytest.raises(Exception) as info:  # noqa: PT011
        k.get(timeout=60)
    assert type(info.value).__name__ == "KeyboardInterrupt"
    # the worker survived and goes on
    assert exits.add.delay(2, 3).get(timeout=60) == 5
    assert w.proc.poll() is None

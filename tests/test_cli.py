"""The ``celeriac`` command line."""

from __future__ import annotations

import importlib
import json
import subprocess

import pytest

from .conftest import CELERIAC, Worker, write_module

TASKS = """
from celeriac import Celery
app = Celery('clitasks')

@app.task(bind=True)
def add(self, x, y):
    self.update_state(state='ADDING', meta={'x': x})
    return x + y
"""


def run(project, *args, input=None):
    return subprocess.run([*CELERIAC, *args], cwd=project, capture_output=True, text=True,
                          input=input, timeout=60)


@pytest.fixture
def tasks(project):
    write_module(project, "clitasks", TASKS)
    return importlib.import_module("clitasks")


def test_result_shows_state_result_and_history(tasks, project, workers):
    workers.append(Worker(project, "clitasks", concurrency=1))
    ok = tasks.add.delay(2, 3)
    bad = tasks.add.delay(2, "a")
    ok.get(timeout=10)
    bad.get(timeout=10, propagate=False)

    out = run(project, "-A", "clitasks", "result", ok.id)
    assert out.returncode == 0, out.stderr
    assert "state:   SUCCESS" in out.stdout and "result:  5" in out.stdout
    lines = out.stdout.splitlines()
    table = lines[lines.index("history:") + 1:]
    assert table[0].split() == ["TIME", "(UTC)", "STATE", "HOSTNAME", "PID", "META"]
    assert [row.split()[1] for row in table[1:]] == ["PENDING", "RECEIVED", "ADDING", "SUCCESS"]

    out = run(project, "-A", "clitasks", "result", bad.id)
    assert "state:   FAILURE" in out.stdout
    assert "error:   TypeError: unsupported operand" in out.stdout
    assert "traceback:" in out.stdout and "return x + y" in out.stdout

    data = json.loads(run(project, "-A", "clitasks", "result", "--json", ok.id).stdout)
    assert data["state"] == "SUCCESS" and data["result"] == 5 and data["exists"] is True
    assert [h["state"] for h in data["history"]] == ["PENDING", "RECEIVED", "ADDING", "SUCCESS"]
    assert data["history"][0]["timestamp"].endswith("+00:00")

    unknown = run(project, "-A", "clitasks", "result", "no-such-id")
    assert "state:   PENDING   (unknown id" in unknown.stdout

    unsafe = run(project, "-A", "clitasks", "result", "../x")
    assert unsafe.returncode != 0 and "not safe as a storage key" in unsafe.stderr


def test_purge(tasks, project):
    for i in range(3):
        tasks.add.delay(i, i)
    refused = run(project, "-A", "clitasks", "purge", input="n\n")
    assert refused.returncode != 0
    out = run(project, "-A", "clitasks", "purge", "-f")
    assert out.returncode == 0 and "Purged 3 messages from 1 queue." in out.stdout
    assert "Purged 0 messages" in run(project, "-A", "clitasks", "purge", "-f").stdout


@pytest.mark.parametrize("args", [[], ["worker"], ["result"], ["purge"]])
def test_help_everywhere(project, args):
    out = run(project, *args, "--help")
    assert out.returncode == 0 and "Usage: " in out.stdout


def test_bad_app_is_a_usage_error(project):
    out = run(project, "-A", "no_such_module_here", "purge", "-f")
    assert out.returncode == 2 and "cannot import 'no_such_module_here'" in out.stderr

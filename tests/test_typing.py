"""Task signatures are typed: mypy rejects a call with the wrong argument types."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SNIPPET = """
from celeriac import Celery

app = Celery("typed", broker="memory://")

@app.task
def add(x: int, y: int) -> int:
    return x + y

@app.task(bind=True)
def bound(self, x: int) -> str:
    return str(x)

ok: int = add(1, 2)
r = add.delay(1, 2)
value: int = r.get()
bound.delay(3)
{bad}
"""


@pytest.mark.parametrize(("bad", "error"), [
    ('add.delay("x", 2)', 'Argument 1 to "delay" of "Task" has incompatible type "str"'),
    ("add.delay(1)", 'Missing positional argument "y" in call to "delay" of "Task"'),
    ('bound.delay("3")', 'Argument 1 to "delay" of "Task" has incompatible type "str"'),
    ('s: str = add.delay(1, 2).get()', "Incompatible types in assignment"),
    ("", None),
])
def test_mypy_checks_task_calls(tmp_path, bad, error):
    path = tmp_path / "snippet.py"
    path.write_text(textwrap.dedent(SNIPPET.format(bad=bad)))
    out = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental",
                          "--cache-dir", str(tmp_path / ".mypy"), str(path)],
                         capture_output=True, text=True, timeout=300)
    if error is None:
        assert out.returncode == 0, out.stdout
    else:
        assert out.returncode == 1 and error in out.stdout, out.stdout

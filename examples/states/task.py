# The seed's first program, with only the import changed and no broker= argument:
# with nothing configured, celeriac uses its embedded SQLite broker (celeriac.db in the
# current directory) and keeps results and states in the same file.
import os

from celeriac import Celery

app = Celery('task')
# STARTED state is not enabled by default so we flip it on
app.conf.update(task_track_started=True)


@app.task(bind=True)
def add(self, x, y):
    # we need to sleep to show STARTED state
    import time
    time.sleep(float(os.environ.get('EXAMPLE_SLEEP', 10)))
    return x + y

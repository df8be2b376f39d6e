# The seed's second program: a custom state, GOING_TO_SLEEP, set by the task itself.
import os

from celeriac import Celery

app = Celery('task')
# STARTED state is not enabled by default so we flip it on
app.conf.update(task_track_started=True)


@app.task(bind=True)
def add(self, x, y):
    self.update_state(state='GOING_TO_SLEEP')
    import time
    time.sleep(float(os.environ.get('EXAMPLE_SLEEP', 10)))
    return x + y

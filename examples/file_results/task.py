# The seed's third program: results kept as files, one celery-task-meta-<id> per task,
# byte-compatible with Celery's filesystem backend (and written atomically).
import os

from celeriac import Celery

app = Celery('task')
app.conf.update(task_track_started=True,
                result_backend=os.environ.get('EXAMPLE_RESULTS', 'file:///var/celery/results'))


@app.task(bind=True)
def add(self, x, y):
    import time
    time.sleep(float(os.environ.get('EXAMPLE_SLEEP', 10)))
    return x + y

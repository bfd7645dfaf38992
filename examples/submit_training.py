"""Submit a training task from the laptop and wait for its metrics, in a few lines.

Run with the scheduler and a worker up (``TP_AMQP_URL``/``TP_REDIS_URL`` point at the desktop):
``python examples/submit_training.py``
"""

from shared.client import SyncClient

with SyncClient() as client:
    record = client.submit_and_wait(
        "train_model", {"dataset": "GOOG", "model": "lstm", "epochs": 5}, priority=7
    )
    print(record.state, record.error or record.result["metrics"])

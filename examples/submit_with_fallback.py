"""Submit a training that runs on the laptop when the desktop cannot run it (local fallback).

    .venv/bin/python examples/submit_with_fallback.py

With the desktop reachable and a worker online it trains there (50 epochs); with RabbitMQ or
Redis unreachable, or no worker online for 30 s, it trains here with the local profile (5 epochs).
The ``__main__`` guard matters: the local run's child process imports this script again.
"""

from shared.client import SyncClient

if __name__ == "__main__":
    with SyncClient(fallback_local=True, start_timeout_s=30) as client:
        config = {"dataset": "GOOG", "epochs": 50, "local": {"epochs": 5}}
        record = client.submit_and_wait("train_model", config)
        where = (
            f"locally ({record.fallback_reason})" if record.fallback_reason else "on the desktop"
        )
        print(f"{record.task_id} {record.state.value} {where}")
        print(record.result["metrics"] if record.result else record.error)

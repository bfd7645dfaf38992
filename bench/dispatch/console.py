"""The benchmark's progress lines."""


def say(message: str) -> None:
    """Print one line at once (the run is often watched through a pipe)."""
    print(message, flush=True)

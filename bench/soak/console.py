"""The soak's progress lines."""


def say(message: str) -> None:
    """Print one line at once: the soak is watched while it runs, often through a pipe."""
    print(message, flush=True)

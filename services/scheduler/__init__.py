"""The scheduler: validates submitted tasks, records them in Redis, routes them by priority."""

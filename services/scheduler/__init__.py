"""The scheduler: validates submitted tasks, records them in Redis and routes them to a priority queue."""

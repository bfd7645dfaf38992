"""The health-monitor: heartbeats, queues and syncs turned into health, metrics and a dashboard."""

"""The kernel every service and the laptop client share: settings, wire messages, broker topology,
the Redis status store, logging, errors and the client library."""

"""The kernel every service and the laptop client share.

Settings, wire messages, broker topology, the Redis status store, logging, errors, the client.
"""

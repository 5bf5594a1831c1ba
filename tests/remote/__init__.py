"""Test infrastructure for remote storage: a real S3 API server (moto) and a fault-injecting proxy.

``server`` starts moto on a free loopback port and creates buckets; ``proxy`` forwards HTTP to it
and injects faults per request; ``fixtures`` exposes both to pytest (registered as a plugin in
``tests/conftest.py``). Nothing here reaches beyond 127.0.0.1.
"""

"""Loopback servers that speak each outside system's documented protocol on 127.0.0.1.

Used by the integration tests, the benchmarks and ``make demo``: one implementation of each
protocol, kept here, so the demo exercises exactly what the tests check.
"""

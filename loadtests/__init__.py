"""Benchmarks for authproxy (timing lives here, never in pass/fail tests).

`python -m loadtests.bench` compares, in one run against one local upstream, an engine
signing in-process (direct TLS), an nginx reverse proxy, and the authproxy sidecar.
"""

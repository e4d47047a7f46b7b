"""A local venue simulator: an HTTPS server that verifies requests the way venues do.

Used by ``authproxy demo``, the end-to-end tests and the benchmarks as an independent oracle
for the sidecar's signers, so it imports neither ``keycache`` nor other ``proxy`` modules.

Run it with ``python -m proxy.simulator --keys KEYS.json --state-dir DIR``; embed it with
:func:`make_app`. Venues: Binance spot (``binance.py``). See ``server.py`` for the
``/__sim/`` test and control endpoints.
"""

from __future__ import annotations

from proxy.simulator.base import KeySetError, SimulatorError
from proxy.simulator.binance import BinanceAccepted, BinanceError, verify_binance
from proxy.simulator.server import SIMULATOR_KEY, RequestLog, Simulator, make_app, system_clock
from proxy.simulator.tlsca import TlsMaterial, make_tls_material, server_ssl_context, write_ca_file

__all__ = [
    "SIMULATOR_KEY",
    "BinanceAccepted",
    "BinanceError",
    "KeySetError",
    "RequestLog",
    "Simulator",
    "SimulatorError",
    "TlsMaterial",
    "make_app",
    "make_tls_material",
    "server_ssl_context",
    "system_clock",
    "verify_binance",
    "write_ca_file",
]

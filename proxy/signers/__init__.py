"""Venue signers, registered by the name used in ``services.<name>.venue``.

Adding a venue is adding a module and a line here.
"""

from __future__ import annotations

from proxy.signers.base import KeySigner, Rejection, SignerContext, TimeEndpoint, Venue
from proxy.signers.binance import BINANCE, BINANCE_USDM

VENUES: dict[str, Venue] = {v.name: v for v in (BINANCE, BINANCE_USDM)}

__all__ = ["VENUES", "KeySigner", "Rejection", "SignerContext", "TimeEndpoint", "Venue"]

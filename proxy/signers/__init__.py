"""Venue signers, registered by the name used in ``services.<name>.venue``.

Adding a venue is adding a module and a line here.
"""

from __future__ import annotations

from proxy.signers.base import KeySigner, Rejection, SignerContext, TimeEndpoint, Venue
from proxy.signers.binance import BINANCE, BINANCE_USDM
from proxy.signers.bitmex import BITMEX
from proxy.signers.bybit import BYBIT
from proxy.signers.coinbase import COINBASE
from proxy.signers.deribit import DERIBIT
from proxy.signers.gemini import GEMINI
from proxy.signers.internal import INTERNAL
from proxy.signers.kraken import KRAKEN
from proxy.signers.okx import OKX

VENUES: dict[str, Venue] = {
    v.name: v
    for v in (
        BINANCE,
        BINANCE_USDM,
        INTERNAL,
        OKX,
        BYBIT,
        COINBASE,
        KRAKEN,
        BITMEX,
        GEMINI,
        DERIBIT,
    )
}

__all__ = ["VENUES", "KeySigner", "Rejection", "SignerContext", "TimeEndpoint", "Venue"]

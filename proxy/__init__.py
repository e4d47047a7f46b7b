"""authproxy: a sidecar that signs trading requests with keys it alone holds."""

from __future__ import annotations

__version__ = "0.1.0"

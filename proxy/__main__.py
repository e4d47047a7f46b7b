"""``python -m proxy`` is ``authproxy``."""

from __future__ import annotations

from proxy.cli import main

main()

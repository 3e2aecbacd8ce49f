"""The Kubernetes deployment in deploy/kubernetes, checked offline.

No cluster and no kustomize binary are needed: :func:`build` walks the overlay's and the base's
``kustomization.yaml`` the way ``kubectl kustomize`` does for the fields they use (resources,
namespace, images, replicas, ConfigMap and Secret generators; any other field fails the test, so
the walk never silently skips a feature). Every object is then validated with
kubernetes-validate against the bundled OpenAPI schemas of named Kubernetes versions, strict
(an unknown or misspelt field fails), and checked for what a site relies on: probes on the
node's health endpoints, a GPU for each worker, the DICOM port the site file names, a site file
the node's own validator accepts, one ``serve --role`` per Deployment, budgets that select pods.
"""

from __future__ import annotations

import base64
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dicom_node.settings import ENV_PREFIX, Settings, load_settings

KUBERNETES = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
OVERLAY = KUBERNETES / "overlays" / "example"

KUBERNETES_VERSIONS = ("1.30", "1.37")
"""The oldest release the manifests claim (README) and the newest kubernetes-validate bundles."""

ROLES = ("receiver", "worker", "sender")
COMPONENT = "app.kubernetes.io/component"
KNOWN_KUSTOMIZATION_FIELDS = {
    "apiVersion", "kind", "resources", "namespace", "images", "replicas", "configMapGenerator", "secretGenerator",
}


@dataclass
class Build:
    """What a kustomization renders to: the objects and the generated data by name."""

    objects: list[dict[str, Any]] = field(default_factory=list)
    generated_files: dict[str, Path] = field(default_factory=dict)
    """``<configmap>/<key>`` -> the file it came from (to load the site file from its path)."""

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        """Every object of ``kind``."""
        return [obj for obj in self.objects if obj["kind"] == kind]

    def named(self, kind: str, name: str) -> dict[str, Any]:
        """The one object of ``kind`` called ``name``."""
        matches = [obj for obj in self.of_kind(kind) if obj["metadata"]["name"] == name]
        assert len(matches) == 1, f"{kind} {name}: {len(matches)} objects"
        return matches[0]

    def deployment(self, role: str) -> dict[str, Any]:
        """The Deployment of a role (``receiver``, ``worker``, ``sender``)."""
        return self.named("Deployment", f"fpe-node-{role}")


def _read_env_file(path: Path) -> dict[str, str]:
    """A kustomize ``envs`` file: KEY=value lines, ``#`` comments and blank lines skipped."""
    pairs = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: line without '=': {line!r}"
        pairs[key.strip()] = value
    return pairs


def _generated(folder: Path, kind: str, spec: dict[str, Any], build: Build) -> dict[str, Any]:
    """The ConfigMap or Secret a generator makes (without kustomize's name suffix)."""
    data: dict[str, str] = {}
    for name in spec.get("files", []):
        key, sep, file_name = name.partition("=")
        path = folder / (file_name if sep else key)
        key = key if sep else path.name
        data[key] = path.read_text(encoding="utf-8")
        build.generated_files[f"{spec['name']}/{key}"] = path
    for name in spec.get("envs", []):
        data.update(_read_env_file(folder / name))
    for literal in spec.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    unknown = set(spec) - {"name", "files", "envs", "literals", "behavior"}
    assert not unknown, f"{folder}: generator fields the walk does not know: {unknown}"
    if kind == "Secret":
        encoded = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
        return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": spec["name"]}, "type": "Opaque", "data": encoded}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": spec["name"]}, "data": data}


def build(folder: Path) -> Build:
    """Render ``folder/kustomization.yaml`` and the kustomizations it names."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["kind"] == "Kustomization"
    unknown = set(kustomization) - KNOWN_KUSTOMIZATION_FIELDS
    assert not unknown, f"{folder}/kustomization.yaml uses fields this walk does not render: {unknown}"
    result = Build()
    for resource in kustomization.get("resources", []):
        path = (folder / resource).resolve()
        assert path.exists(), f"{folder}/kustomization.yaml names {resource}, which does not exist"
        if path.is_dir():
            inner = build(path)
            result.objects.extend(inner.objects)
            result.generated_files.update(inner.generated_files)
        else:
            result.objects.extend(doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc)
    for spec in kustomization.get("configMapGenerator", []):
        result.objects.append(_generated(folder, "ConfigMap", spec, result))
    for spec in kustomization.get("secretGenerator", []):
        result.objects.append(_generated(folder, "Secret", spec, result))
    if "namespace" in kustomization:
        for obj in result.objects:
            if obj["kind"] != "Namespace":
                obj["metadata"]["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        used = [c for c in _all_containers(result) if c["image"] == image["name"]]
        assert used, f"{folder}: images names {image['name']}, which no container uses"
        for container in used:
            container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    for replicas in kustomization.get("replicas", []):
        result.named("Deployment", replicas["name"])["spec"]["replicas"] = replicas["count"]
    return result


def _all_containers(result: Build) -> Iterator[dict[str, Any]]:
    for deployment in result.of_kind("Deployment"):
        yield from _containers(deployment)


def _containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    pod = deployment["spec"]["template"]["spec"]
    containers: list[dict[str, Any]] = pod["containers"] + pod.get("initContainers", [])
    return containers


@pytest.fixture(scope="module")
def site() -> Build:
    """The example overlay, rendered (base included)."""
    return build(OVERLAY)


def _env(container: dict[str, Any], site: Build) -> dict[str, str]:
    """The container's environment with Secret and ConfigMap references resolved."""
    env = {}
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
            continue
        source = variable["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = site.named("Secret", ref["name"])
            env[variable["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        else:
            ref = source["configMapKeyRef"]
            env[variable["name"]] = site.named("ConfigMap", ref["name"])["data"][ref["key"]]
    return env


def _settings(site: Build, role: str) -> Settings:
    """The settings a role's pod starts with: the mounted site file and the container's environment."""
    (container,) = _deployment_containers(site, role)
    config_file = site.generated_files["fpe-node-config/site.yaml"]
    return load_settings(config_file, environ=_env(container, site))


def _deployment_containers(site: Build, role: str) -> list[dict[str, Any]]:
    return site.deployment(role)["spec"]["template"]["spec"]["containers"]


def _port(container: dict[str, Any], name_or_number: str | int) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    (number,) = [port["containerPort"] for port in container["ports"] if port["name"] == name_or_number]
    return int(number)


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_for_kubernetes(site: Build, version: str) -> None:
    """Strict schema validation: a wrong type, a missing required field or an unknown field fails."""
    kinds = set()
    refused = []
    for obj in site.objects:
        kinds.add(obj["kind"])
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(part) for part in exc.path)
            refused.append(f"{obj['kind']} {obj['metadata']['name']} at {where}: {exc.message}")
    assert not refused, f"refused by the Kubernetes {version} schemas:\n" + "\n".join(refused)
    assert {"Namespace", "ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment", "Service",
            "PodDisruptionBudget"} <= kinds


def test_a_misspelt_field_is_refused() -> None:
    """The strict validation above would catch a typo (the test's own control)."""
    deployment = build(BASE).deployment("receiver")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/", "port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_every_manifest_file_is_in_the_build() -> None:
    """A manifest left out of kustomization.yaml would never be applied."""
    for folder in (BASE, OVERLAY):
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))
        named = set(kustomization.get("resources", []))
        named |= {name for spec in kustomization.get("configMapGenerator", []) for name in spec.get("files", [])}
        for manifest in sorted(folder.glob("*.yaml")):
            if manifest.name != "kustomization.yaml":
                assert manifest.name in named, f"{manifest} is not in {folder.name}/kustomization.yaml"


@pytest.mark.parametrize("role", ROLES)
def test_each_role_starts_serve_with_its_role(site: Build, role: str) -> None:
    deployment = site.deployment(role)
    (container,) = _deployment_containers(site, role)
    command = container["command"] + container["args"]
    assert command[:4] == ["fpe-node", "serve", "--role", role], shlex.join(command)
    from dicom_node.cli import build_parser

    parsed = build_parser().parse_args(command[1:])  # the node's own CLI takes the command as written
    assert parsed.role == role
    assert deployment["spec"]["template"]["metadata"]["labels"][COMPONENT] == role
    assert deployment["spec"]["replicas"] >= 1


@pytest.mark.parametrize("role", ROLES)
def test_probes_ask_the_node_on_its_console_port(site: Build, role: str) -> None:
    """Liveness /health/live, readiness /health/ready, on the port console.port names."""
    (container,) = _deployment_containers(site, role)
    settings = _settings(site, role)
    assert settings.console.enabled and settings.console.host == "0.0.0.0"  # the kubelet calls the pod address
    for probe, path in (("startupProbe", "/health/live"), ("livenessProbe", "/health/live"),
                        ("readinessProbe", "/health/ready")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert _port(container, get["port"]) == settings.console.port, probe


def test_site_file_is_a_valid_node_config_with_the_external_index(site: Build) -> None:
    """The node's own validator accepts the mounted file with each pod's environment."""
    for role in ROLES:
        settings = _settings(site, role)
        assert settings.index_url.startswith("postgresql+psycopg://fpenode:CHANGE-ME@")
        assert str(settings.storage.data_dir) == "/var/lib/fpe-node"
        assert settings.storage.fsync
    (container,) = _deployment_containers(site, "receiver")
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert mounts["/etc/fpe-node"] == "config"  # the image's FPENODE_CONFIG is /etc/fpe-node/site.yaml
    config = next(v for v in site.deployment("receiver")["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    sources = {source.get("configMap", {}).get("name") for source in config["projected"]["sources"]}
    assert "fpe-node-config" in sources


def test_site_file_passes_config_check(site: Build) -> None:
    """``fpe-node config check`` in each pod environment: every file the settings name is read as at start-up.

    One run per distinct environment (the roles share theirs today), each a real ``fpe-node`` process.
    """
    environments: dict[tuple[tuple[str, str], ...], str] = {}
    for role in ROLES:
        (container,) = _deployment_containers(site, role)
        node_env = {name: value for name, value in _env(container, site).items() if name.startswith(ENV_PREFIX)}
        environments.setdefault(tuple(sorted(node_env.items())), role)
    config_file = site.generated_files["fpe-node-config/site.yaml"]
    for pairs, role in environments.items():
        env = {name: value for name, value in os.environ.items() if not name.upper().startswith(ENV_PREFIX)}
        env.update(dict(pairs), PYTHONPATH=str(KUBERNETES.parents[1]))
        done = subprocess.run(
            [sys.executable, "-m", "dicom_node", "--config", str(config_file), "config", "check"],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, f"{role}: {done.stderr}"
        assert "settings are valid" in done.stdout


def test_workers_get_a_gpu_and_use_it(site: Build) -> None:
    (container,) = _deployment_containers(site, "worker")
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _settings(site, "worker").inference.device == "auto"
    for role in ("receiver", "sender"):
        (other,) = _deployment_containers(site, role)
        assert "nvidia.com/gpu" not in other["resources"].get("limits", {}), role


def test_dicom_service_exposes_the_port_the_site_file_names(site: Build) -> None:
    settings = _settings(site, "receiver")
    service = site.named("Service", "fpe-node-dicom")
    receivers = site.deployment("receiver")["spec"]["template"]["metadata"]["labels"]
    assert _selects(service["spec"]["selector"], receivers)
    for role in ("worker", "sender"):
        assert not _selects(service["spec"]["selector"], site.deployment(role)["spec"]["template"]["metadata"]["labels"])
    (container,) = _deployment_containers(site, "receiver")
    (port,) = service["spec"]["ports"]
    assert port["port"] == settings.network.port
    assert _port(container, port["targetPort"]) == settings.network.port
    # The calling-host check needs the peer's own address, not a cluster node's.
    assert not settings.network.check_calling_host or service["spec"]["externalTrafficPolicy"] == "Local"


def test_console_service_reaches_a_console(site: Build) -> None:
    settings = _settings(site, "receiver")
    service = site.named("Service", "fpe-node-console")
    selected = [d for d in site.of_kind("Deployment") if _selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
    assert selected
    (port,) = service["spec"]["ports"]
    for deployment in selected:
        assert _port(_containers(deployment)[0], port["targetPort"]) == settings.console.port


def test_disruption_budgets_select_receivers_and_workers(site: Build) -> None:
    budgets = {pdb["metadata"]["name"]: pdb for pdb in site.of_kind("PodDisruptionBudget")}
    for role in ("receiver", "worker"):
        budget = budgets[f"fpe-node-{role}"]
        selected = [
            d["metadata"]["name"] for d in site.of_kind("Deployment")
            if _selects(budget["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert selected == [f"fpe-node-{role}"]
        assert budget["spec"]["minAvailable"] == 1
        assert site.deployment(role)["spec"]["replicas"] >= 1


@pytest.mark.parametrize("role", ROLES)
def test_pods_are_unprivileged_and_share_the_volume(site: Build, role: str) -> None:
    pod = site.deployment(role)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for container in _containers(site.deployment(role)):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
        assert {mount["name"] for mount in mounts.values()} <= set(volumes)
        data = volumes[mounts[str(_settings(site, role).storage.data_dir)]["name"]]
        assert data["persistentVolumeClaim"]["claimName"] == "fpe-node-data"
        assert "/tmp" in mounts  # the only writable place besides the shared volume
    claims = {claim["metadata"]["name"]: claim for claim in site.of_kind("PersistentVolumeClaim")}
    for volume in volumes.values():
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in claims
    assert claims["fpe-node-data"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_termination_grace_covers_the_serve_grace(site: Build) -> None:
    """The kubelet waits longer than serve --grace, and a worker long enough for one analysis."""
    for role in ROLES:
        pod = site.deployment(role)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        grace = float(container["args"][container["args"].index("--grace") + 1])
        assert pod["terminationGracePeriodSeconds"] > grace, role
    assert site.deployment("worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 120

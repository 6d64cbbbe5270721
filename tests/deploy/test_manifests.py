"""The Kubernetes manifests, validated offline, and held to what the worker states about itself.

Core objects are validated against the Kubernetes schemas bundled by `kubernetes-validate`
(strict: an unknown field fails); the custom resources against the openAPIV3Schema of their
CRDs vendored in deploy/crds, made strict the same way (unknown fields fail, as kubectl's
server-side field validation would reject them).
"""

import copy
import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from tests.deploy.support import DEPLOY, load_yaml
from worker.settings import WorkerSettings
from worker.topology import work_queue_names

KUBERNETES = DEPLOY / "kubernetes"
CRDS = DEPLOY / "crds"
# The oldest Kubernetes the manifests promise (PodDisruptionBudget's unhealthyPodEvictionPolicy
# is GA in 1.31) and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
CUSTOM_KINDS = {"ServiceMonitor", "ScaledObject", "TriggerAuthentication"}
# The trigger metadata KEDA's RabbitMQ scaler reads (`keda:"..., order=triggerMetadata"` in
# pkg/scalers/rabbitmq_scaler.go, kedacore/keda 8b4f083c); a ScaledObject's metadata is a free
# map in the CRD, so a misspelt key would pass its schema and be ignored.
RABBITMQ_TRIGGER_METADATA = {
    "queueName", "mode", "queueLength", "value", "activationValue", "host", "hostFromEnv",
    "protocol", "vhostName", "useRegex", "excludeUnacknowledged", "pageSize", "operation",
    "timeout", "unsafeSsl",
}  # fmt: skip
MEASURED_RSS_MIB = 96.4 * 1000**2 / 1024**2  # README, "Performance": 96.4 MB at prefetch 256


def manifests() -> dict[str, dict[str, Any]]:
    """Return every object the kustomization applies, by kind."""
    kustomization = load_yaml(KUBERNETES / "kustomization.yaml")
    objects = [load_yaml(KUBERNETES / name) for name in kustomization["resources"]]
    return {obj["kind"]: obj for obj in objects}


def deployment() -> dict[str, Any]:
    """Return the Deployment."""
    return manifests()["Deployment"]


def worker_container() -> dict[str, Any]:
    """Return the Deployment's one container."""
    [container] = deployment()["spec"]["template"]["spec"]["containers"]
    return container


def worker_env() -> dict[str, str]:
    """Return the container's literal environment variables."""
    return {var["name"]: var["value"] for var in worker_container()["env"] if "value" in var}


def strict(schema: Any) -> Any:
    """Return a copy of an OpenAPI schema in which objects refuse properties they do not name."""
    schema = copy.deepcopy(schema)

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def crd_schema(kind: str, api_version: str) -> Any:
    """Return the strict schema of a custom resource, from the vendored CRD of its kind."""
    group, version = api_version.split("/")
    for path in CRDS.glob("*.yaml"):
        crd = load_yaml(path)
        if crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == group:
            [served] = [v for v in crd["spec"]["versions"] if v["name"] == version]
            return strict(served["schema"]["openAPIV3Schema"])
    raise AssertionError(f"no vendored CRD for {kind} {api_version} in {CRDS}")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_are_valid_kubernetes(version: str) -> None:
    core = [obj for kind, obj in manifests().items() if kind not in CUSTOM_KINDS]
    core.append(load_yaml(KUBERNETES / "secret.example.yaml"))
    assert {obj["kind"] for obj in core} >= {
        "Deployment", "Service", "PodDisruptionBudget", "ServiceAccount", "Secret"
    }  # fmt: skip
    for obj in core:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("kind", sorted(CUSTOM_KINDS))
def test_custom_resources_are_valid_against_their_vendored_crds(kind: str) -> None:
    obj = manifests()[kind]
    jsonschema.validate(obj, crd_schema(kind, obj["apiVersion"]))


def test_the_crd_check_refuses_a_misspelt_field() -> None:
    # Given the ScaledObject with a field KEDA does not know
    obj = copy.deepcopy(manifests()["ScaledObject"])
    obj["spec"]["maxReplicas"] = 8
    # Then the vendored schema refuses it
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas"):
        jsonschema.validate(obj, crd_schema("ScaledObject", obj["apiVersion"]))


def test_the_kustomization_applies_every_manifest_but_the_example_secret() -> None:
    listed = set(load_yaml(KUBERNETES / "kustomization.yaml")["resources"])
    present = {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert present - listed == {"secret.example.yaml"}
    assert listed <= present


def test_the_grace_period_exceeds_the_workers_shutdown_bound() -> None:
    bound = WorkerSettings.model_fields["shutdown_timeout_seconds"].default
    assert "WORKER_SHUTDOWN_TIMEOUT_SECONDS" not in worker_env()
    assert deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > bound


def test_the_probes_ask_the_workers_health_endpoints_on_its_port() -> None:
    container = worker_container()
    [port] = container["ports"]
    assert str(port["containerPort"]) == worker_env()["WORKER_HTTP_PORT"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}


def test_the_pod_runs_as_the_images_user_on_a_read_only_root() -> None:
    dockerfile = (DEPLOY.parent / "Dockerfile").read_text(encoding="utf-8")
    [image_user] = re.findall(r"^USER (\d+)$", dockerfile, re.M)
    pod = deployment()["spec"]["template"]["spec"]
    container = worker_container()["securityContext"]
    assert pod["securityContext"]["runAsUser"] == int(image_user) == 10001
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]


def test_memory_requested_covers_the_measured_peak() -> None:
    resources = worker_container()["resources"]
    request = mebibytes(resources["requests"]["memory"])
    assert request > MEASURED_RSS_MIB
    assert mebibytes(resources["limits"]["memory"]) >= 2 * request


def mebibytes(quantity: str) -> float:
    """Return a Kubernetes memory quantity in MiB (Mi and Gi suffixes)."""
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return float(number) * (1024 if unit == "Gi" else 1)


def test_the_scaler_reads_every_partition_queue_and_never_exceeds_the_partitions() -> None:
    # Given the queues the worker consumes, from the Deployment's settings
    env = worker_env()
    partitions = int(env["WORKER_PARTITIONS"])
    queues = work_queue_names(env["WORKER_QUEUE"], partitions)
    scaled = manifests()["ScaledObject"]["spec"]
    # Then the ScaledObject scales this Deployment on exactly those queues, 2 to partitions
    assert scaled["scaleTargetRef"]["name"] == deployment()["metadata"]["name"]
    assert [t["metadata"]["queueName"] for t in scaled["triggers"]] == queues
    assert 2 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"] <= partitions
    for trigger in scaled["triggers"]:
        assert trigger["type"] == "rabbitmq"
        assert set(trigger["metadata"]) <= RABBITMQ_TRIGGER_METADATA
        # Over AMQP the scaler knows only QueueLength; the other modes need the HTTP API.
        assert trigger["metadata"]["protocol"] == "amqp"
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert (
            trigger["authenticationRef"]["name"]
            == manifests()["TriggerAuthentication"]["metadata"]["name"]
        )


def test_keda_reads_the_broker_url_the_worker_reads() -> None:
    [ref] = manifests()["TriggerAuthentication"]["spec"]["secretTargetRef"]
    [source] = worker_container()["envFrom"]
    secret = load_yaml(KUBERNETES / "secret.example.yaml")
    assert ref["parameter"] == "host"
    assert ref["name"] == source["secretRef"]["name"] == secret["metadata"]["name"]
    assert ref["key"] == "WORKER_AMQP_URL" and ref["key"] in secret["stringData"]


def test_service_monitor_service_and_budget_select_the_workers_pods() -> None:
    objects = manifests()
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selectors = [
        objects["Deployment"]["spec"]["selector"]["matchLabels"],
        objects["Service"]["spec"]["selector"],
        objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= labels.items()
    monitor = objects["ServiceMonitor"]["spec"]
    assert (
        monitor["selector"]["matchLabels"].items()
        <= objects["Service"]["metadata"]["labels"].items()
    )
    [endpoint] = monitor["endpoints"]
    [service_port] = objects["Service"]["spec"]["ports"]
    assert endpoint["port"] == service_port["name"]
    assert endpoint["path"] == "/metrics"
    assert service_port["targetPort"] == worker_container()["ports"][0]["name"]


def test_the_vendored_crds_name_their_source() -> None:
    sources = (CRDS / "README.md").read_text(encoding="utf-8")
    for path in CRDS.glob("*.yaml"):
        assert f"`{path.name}`" in sources, f"{path.name} has no source in deploy/crds/README.md"

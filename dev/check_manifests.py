#!/usr/bin/env python3
"""Checks the deployment files against what they must agree with.

docker-compose.yml (and its embedded-store override) and the k8s/ overlays, rendered with
`kubectl kustomize`, are compared with schemas/topology.toml (topics, partitions,
consumer groups, queues), dev/mosquitto.conf (the broker's sizing and persistence), the
configuration keys the binaries read, and the upstream schemas in
../shared/external-schemas beside the repository (Compose specification, KEDA CRDs), which are
used when present and reported as skipped when not.

    ~/.cache/iotp/venv/bin/pip install -r dev/requirements-check.txt
    ~/.cache/iotp/venv/bin/python dev/check_manifests.py

Prints one line per check, then `N passed, M failed`; exits 1 if any check failed.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jsonschema
import yaml

# Environment variables each binary reads. Services use figment (`IOTP__SECTION__KEY`, unknown
# keys are an error at start-up); iotp-topology reads the `env =` names of its clap flags.
# Any other IOTP_ variable is a typo that would stop the container, or be silently ignored.
# A service gains keys here when its config struct does and the deployment needs them.
COMMON_KEYS = {
    "IOTP__COMMON__REPLICA",
    "IOTP__COMMON__ADMIN_LISTEN",
    "IOTP__COMMON__LOG_FORMAT",
    "IOTP__COMMON__SHUTDOWN_DEADLINE",
}
KAFKA_KEYS = {"IOTP__KAFKA__BROKERS"}
# Secrets as files: IOTP_FILE__SECTION__KEY names the file holding section.key
# (services/iotp-core/src/config.rs).
DEAD_LETTER_FILE_KEY = "IOTP_FILE__IO__DEAD_LETTER__AMQP_URI"
STORE_KEYS = {"IOTP_FILE__STORE__MONGODB_URI", "IOTP__STORE__PATH"}
REGISTRY_KEY = "IOTP__REGISTRY_FILE"
BRIDGE_KEYS = {
    "IOTP__MQTT__HOST",
    "IOTP__MQTT__PORT",
    "IOTP__MQTT__USERNAME",
    "IOTP__MQTT__PASSWORD",
    "IOTP__MQTT__TLS__CA_FILE",
    "IOTP__MQTT__TLS__CERT_FILE",
    "IOTP__MQTT__TLS__KEY_FILE",
    "IOTP__MQTT__IDENTITY",
    "IOTP__RAW_TOPIC",
}
# The parser runs on the Kafka stage runtime, which publishes dead letters to RabbitMQ.
DEAD_LETTER_KEY = "IOTP__IO__DEAD_LETTER__AMQP_URI"
DEAD_LETTERING = COMMON_KEYS | KAFKA_KEYS | {DEAD_LETTER_KEY, DEAD_LETTER_FILE_KEY}
# The bridge dead-letters a PUBLISH whose record Kafka refuses for good (section `dead_letter`).
BRIDGE_DEAD_LETTER_KEYS = ["IOTP__DEAD_LETTER__AMQP_URI", "IOTP_FILE__DEAD_LETTER__AMQP_URI"]
ALLOWED_ENV = {
    "iotp-mqtt-bridge": COMMON_KEYS | KAFKA_KEYS | BRIDGE_KEYS | set(BRIDGE_DEAD_LETTER_KEYS),
    "iotp-parser": DEAD_LETTERING | {REGISTRY_KEY},
    "iotp-enricher": DEAD_LETTERING | STORE_KEYS | {REGISTRY_KEY},
    "iotp-upserter": DEAD_LETTERING | STORE_KEYS,
    "iotp-aggregator": DEAD_LETTERING | STORE_KEYS | {REGISTRY_KEY},
    "iotp-dlq-handler": COMMON_KEYS | KAFKA_KEYS | STORE_KEYS
    | {"IOTP_FILE__AMQP_URI", "IOTP__API_LISTEN", "IOTP__API_TOKEN_FILE"},
    "iotp-topology": {"IOTP__KAFKA__BROKERS", "IOTP_AMQP_URI"},
}
SERVICES = [b for b in ALLOWED_ENV if b != "iotp-topology"]
BRIDGE = "iotp-mqtt-bridge"
DLQ_HANDLER = "iotp-dlq-handler"

# dev/mosquitto.conf settings every deployed broker must repeat: they are the outage budget
# (how much a bridge session may fall behind before drops), persistence, and the $SYS
# interval the bridge watches.
MOSQUITTO_SHARED = (
    "max_queued_messages",
    "max_queued_bytes",
    "persistence",
    "autosave_interval",
    "persistent_client_expiration",
    "max_inflight_messages",
    "sys_interval",
)
# Production Mosquitto (and dev/mosquitto-tls.conf): mutual TLS 1.2+, the certificate's CN is
# the username the ACL matches, revoked certificates refused (the CRL).
MOSQUITTO_PRODUCTION = {
    "tls_version": "tlsv1.2",
    "require_certificate": "true",
    "use_identity_as_username": "true",
    "allow_anonymous": "false",
}
MOSQUITTO_TLS_FILES = ("cafile", "certfile", "keyfile", "crlfile", "acl_file")
# dev/mosquitto.acl, which k8s must carry unchanged: devices write only their own telemetry
# and heartbeat topics and read only their own command topic; the bridge reads telemetry.
MOSQUITTO_ACL_LINES = ("pattern write iot/%u/+", "pattern read cmd/%u", "user iotp-bridge",
                       "topic read iot/#", "topic read $SYS/broker/#",
                       "topic readwrite iotp-bridges/#")

# Common::default() in services/iotp-core/src/config.rs.
DEFAULT_SHUTDOWN_DEADLINE = "25s"
ADMIN_PORT = 9100

ROOT = Path(__file__).resolve().parent.parent
EXTERNAL_SCHEMAS = ROOT.parent / "shared" / "external-schemas"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


class Checks:
    """Runs checks, prints one line each, counts."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def run(self, name: str, check: Callable[[], list[str]]) -> None:
        try:
            problems = check()
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            problems = [f"malformed input ({type(e).__name__}: {e})"]
        if problems:
            self.failed += 1
            print(f"FAIL {name}: " + "; ".join(problems))
        else:
            self.passed += 1
            print(f"PASS {name}")


@dataclass
class Container:
    """A process the deployment starts: where it is declared, its argv and environment."""

    where: str
    name: str  # the compose service or the k8s workload
    kind: str  # "service" in compose, the workload's kind in k8s
    argv: list[str]
    env: dict[str, Any]  # literal values (ConfigMap references resolved) or a k8s valueFrom
    owner: dict[str, Any]  # the compose service or the k8s workload
    spec: dict[str, Any]  # the compose service or the k8s container

    @property
    def binary(self) -> str:
        return Path(self.argv[0]).name if self.argv else ""


def seconds(duration: Any) -> float:
    """'25s', '1m30s', '500ms' (humantime and compose style) or a number of seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    text = str(duration).replace(" ", "")
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"cannot read duration {duration!r}")
    return sum(float(n) * units[u] for n, u in parts)


def mosquitto_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            settings.setdefault(key, []).append(value.strip())
    return settings


def compare_mosquitto(config: dict[str, list[str]], dev: dict[str, list[str]]) -> list[str]:
    return [
        f"{key} is {config.get(key)} but dev/mosquitto.conf has {dev.get(key)}"
        for key in MOSQUITTO_SHARED
        if config.get(key) != dev.get(key)
    ]


def bridge_port_problems(containers: list[Container], settings: dict[str, list[str]]) -> list[str]:
    """The bridge must dial the port the broker's listener opens."""
    port = settings.get("listener", [""])[0].split(" ")[0]
    return [f"{c.where}: IOTP__MQTT__PORT {c.env.get('IOTP__MQTT__PORT')} is not the listener "
            f"port {port}" for c in deployed(containers, BRIDGE)
            if str(c.env.get("IOTP__MQTT__PORT")) != port]


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d]


# ---------------------------------------------------------------------------------------------
# Reading the deployment


def compose_containers(compose: dict[str, Any]) -> list[Container]:
    out = []
    for name, svc in (compose.get("services") or {}).items():
        command = svc.get("command") or []
        argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
        if svc.get("entrypoint"):
            entry = svc["entrypoint"]
            argv = (shlex.split(entry) if isinstance(entry, str) else list(entry)) + argv
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
        out.append(Container(f"compose service {name}", name, "service", argv, env, svc, svc))
    return out


class ComposeTag(str):
    """`!reset` / `!override` in a Compose override file (the merge rules of the spec)."""

    def __new__(cls, tag: str, value: Any) -> "ComposeTag":
        obj = super().__new__(cls, tag)
        obj.value = value
        return obj


class OverrideLoader(yaml.SafeLoader):
    pass


for _tag in ("!reset", "!override"):
    OverrideLoader.add_constructor(_tag, lambda loader, node, tag=_tag: ComposeTag(
        tag, loader.construct_mapping(node, deep=True) if isinstance(node, yaml.MappingNode)
        else loader.construct_sequence(node, deep=True) if isinstance(node, yaml.SequenceNode)
        else loader.construct_scalar(node)))


def compose_merge(base: Any, override: Any) -> Any:
    """Compose's merge: mappings merge, sequences append, `!reset` removes, `!override`
    replaces; command, entrypoint and healthcheck replace."""
    if isinstance(override, ComposeTag):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            if isinstance(value, ComposeTag) and value == "!reset":
                out.pop(key, None)
            elif key in out and key not in ("command", "entrypoint"):
                out[key] = compose_merge(out[key], value)
            else:
                out[key] = compose_merge(None, value)
        return out
    if isinstance(base, list) and isinstance(override, list):
        return base + [v for v in override if v not in base]
    return override


class K8s:
    """The objects of one overlay (`kubectl kustomize k8s/overlays/NAME`), and the containers
    of their workloads."""

    def __init__(self, overlay: Path) -> None:
        self.directory = overlay
        rendered = subprocess.run(["kubectl", "kustomize", str(overlay)], check=True,
                                  capture_output=True, text=True).stdout
        name = f"overlays/{overlay.name}"
        self.objects: list[tuple[str, dict[str, Any]]] = [
            (name, d) for d in yaml.safe_load_all(rendered) if d]
        self.containers = self._containers()

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [doc for _, doc in self.objects if doc.get("kind") == kind]

    def named(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((d for d in self.of_kind(kind) if d["metadata"]["name"] == name), None)

    def config_value(self, ref: dict[str, Any]) -> str | None:
        config_map = self.named("ConfigMap", ref["name"])
        return None if config_map is None else (config_map.get("data") or {}).get(ref["key"])

    def env_value(self, value: Any) -> Any:
        """A literal, or what a configMapKeyRef points at (other sources stay opaque)."""
        if isinstance(value, dict) and "configMapKeyRef" in value:
            return self.config_value(value["configMapKeyRef"])
        return value

    def _containers(self) -> list[Container]:
        out = []
        for file, doc in self.objects:
            if doc.get("kind") not in WORKLOAD_KINDS:
                continue
            pod = doc["spec"]["template"]["spec"]
            for c in pod.get("initContainers", []) + pod.get("containers", []):
                env = {e["name"]: self.env_value(e.get("value", e.get("valueFrom")))
                       for e in c.get("env", [])}
                argv = [str(a) for a in c.get("command", []) + c.get("args", [])]
                # $(VAR) is expanded by the kubelet from the container's own environment.
                argv = [re.sub(r"\$\((\w+)\)", lambda m: str(env.get(m[1])), a) for a in argv]
                where = f"k8s {file} {doc['kind']}/{doc['metadata']['name']}"
                out.append(Container(where, doc["metadata"]["name"], doc["kind"], argv, env, doc, c))
        return out


def deployed(containers: list[Container], binary: str) -> list[Container]:
    return [c for c in containers if c.binary == binary]


def service_containers(containers: list[Container]) -> list[Container]:
    return [c for b in SERVICES for c in deployed(containers, b)]


def flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


# ---------------------------------------------------------------------------------------------
# Upstream schemas


def strict(schema: Any) -> Any:
    """Unknown fields become errors, as with `kubectl apply --validate=strict`; the CRD schema
    alone would let the API server prune a misspelt field (`maxReplicas`) silently."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: ({name: strict(s) for name, s in value.items()} if key == "properties"
                 else strict(value))
           for key, value in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def schema_errors(validator: jsonschema.protocols.Validator, doc: Any) -> list[str]:
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{e.json_path}: {e.message}" for e in errors[:5]]


def check_compose_schema(checks: Checks, compose: dict[str, Any]) -> None:
    path = EXTERNAL_SCHEMAS / "compose-spec.json"
    if not path.exists():
        print(f"SKIPPED compose-spec validation: {path} not found")
        return
    validator = jsonschema.Draft7Validator(json.loads(path.read_text()))
    checks.run("compose-spec validation of docker-compose.yml",
               lambda: schema_errors(validator, compose))


def check_keda_schemas(checks: Checks, k8s: K8s) -> None:
    for crd_file in ("keda.sh_scaledobjects.yaml", "keda.sh_triggerauthentications.yaml"):
        path = EXTERNAL_SCHEMAS / crd_file
        if not path.exists():
            print(f"SKIPPED KEDA CRD validation: {path} not found")
            continue
        crd = yaml.safe_load(path.read_text())
        kind = crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            api_version = f"{crd['spec']['group']}/{version['name']}"
            schema = strict(version["schema"]["openAPIV3Schema"])
            validator = jsonschema.Draft7Validator(schema)
            for doc in k8s.of_kind(kind):
                if doc.get("apiVersion") != api_version:
                    continue
                checks.run(f"KEDA CRD validation of {kind}/{doc['metadata']['name']}",
                           lambda doc=doc: schema_errors(validator, doc))
        served = {f"{crd['spec']['group']}/{v['name']}" for v in crd["spec"]["versions"]}
        checks.run(f"every {kind} uses a served apiVersion ({', '.join(sorted(served))})",
                   lambda kind=kind, served=served: [
                       f"{d['metadata']['name']} uses {d.get('apiVersion')}"
                       for d in k8s.of_kind(kind) if d.get("apiVersion") not in served])


# ---------------------------------------------------------------------------------------------
# Agreement with topology.toml


def scale_target_runs(k8s: K8s, scaled_object: dict[str, Any], binary: str) -> list[str]:
    ref = scaled_object["spec"]["scaleTargetRef"]
    kind = ref.get("kind", "Deployment")
    target = k8s.named(kind, ref["name"])
    if target is None:
        return [f"scaleTargetRef {kind}/{ref['name']} does not exist in k8s/"]
    runs = [c.binary for c in k8s.containers if c.owner is target]
    return [] if binary in runs else [f"scaleTargetRef {kind}/{ref['name']} runs {runs}, not {binary}"]


def triggers(k8s: K8s, trigger_type: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(so, t) for so in k8s.of_kind("ScaledObject") for t in so["spec"]["triggers"]
            if t["type"] == trigger_type]


def check_kafka_scaling(checks: Checks, k8s: K8s, topology: dict[str, Any], brokers: str | None) -> None:
    partitions = {t["name"]: t["partitions"] for t in topology["kafka"]["topics"]}
    kafka = triggers(k8s, "kafka")
    for consumer in topology["kafka"]["consumers"]:
        service, group, topics = consumer["service"], consumer["group"], consumer["topics"]

        def check(service=service, group=group, topics=topics) -> list[str]:
            found = [(so, t) for so, t in kafka if t["metadata"].get("consumerGroup") == group]
            if len(found) != 1:
                return [f"{len(found)} ScaledObjects trigger on consumer group {group}, want 1"]
            if len(topics) != 1:
                return [f"topology gives {service} {len(topics)} topics; a kafka trigger names one"]
            so, trigger = found[0]
            metadata, topic = trigger["metadata"], topics[0]
            problems = scale_target_runs(k8s, so, f"iotp-{service}")
            if metadata.get("topic") != topic:
                problems.append(f"trigger topic is {metadata.get('topic')!r}, topology says {topic!r}")
            max_replicas = so["spec"].get("maxReplicaCount", 100)  # KEDA's default
            if topic not in partitions:
                problems.append(f"topology has no topic {topic}")
            elif max_replicas > partitions[topic]:
                problems.append(f"maxReplicaCount {max_replicas} exceeds {topic}'s "
                                f"{partitions[topic]} partitions (extra members sit idle)")
            if metadata.get("bootstrapServers") != brokers:
                problems.append(f"bootstrapServers {metadata.get('bootstrapServers')!r} is not "
                                f"the services' IOTP__KAFKA__BROKERS {brokers!r}")
            return problems

        checks.run(f"k8s KEDA scales {service} on group {group}, topic {','.join(topics)}", check)

    groups = {c["group"] for c in topology["kafka"]["consumers"]}
    checks.run("k8s KEDA kafka triggers name only topology consumer groups", lambda: [
        f"ScaledObject {so['metadata']['name']} triggers on unknown group "
        f"{t['metadata'].get('consumerGroup')!r}"
        for so, t in kafka if t["metadata"].get("consumerGroup") not in groups])


def check_dlq_scaling(checks: Checks, k8s: K8s, topology: dict[str, Any]) -> None:
    queue = topology["rabbitmq"]["incoming_queue"]

    def check() -> list[str]:
        found = triggers(k8s, "rabbitmq")
        if len(found) != 1:
            return [f"{len(found)} rabbitmq triggers, want 1"]
        so, trigger = found[0]
        problems = scale_target_runs(k8s, so, DLQ_HANDLER)
        if trigger["metadata"].get("queueName") != queue:
            problems.append(f"queueName {trigger['metadata'].get('queueName')!r}, topology says {queue!r}")
        if trigger["metadata"].get("mode") != "QueueLength":
            problems.append(f"mode {trigger['metadata'].get('mode')!r}, want QueueLength")
        auth_name = (trigger.get("authenticationRef") or {}).get("name")
        auth = k8s.named("TriggerAuthentication", auth_name) if auth_name else None
        if auth is None:
            problems.append(f"authenticationRef {auth_name!r} names no TriggerAuthentication in k8s/")
        elif not any(r.get("parameter") == "host" for r in auth["spec"].get("secretTargetRef", [])):
            problems.append(f"TriggerAuthentication {auth_name} takes no host from a Secret")
        return problems

    checks.run(f"k8s KEDA scales dlq-handler on queue {queue}", check)


# ---------------------------------------------------------------------------------------------
# The services' configuration


def check_env_keys(checks: Checks, label: str, containers: list[Container]) -> None:
    def check() -> list[str]:
        problems = []
        for c in containers:
            used = sorted(k for k in c.env if k.startswith("IOTP_"))
            # The simulator (compose profile) is configured by its flags only.
            allowed = ALLOWED_ENV.get(c.binary, set() if c.binary == "iotp-simulator" else None)
            if allowed is None:
                if c.binary.startswith("iotp-") or used:
                    problems.append(f"{c.where}: binary {c.binary!r} has no known keys (sets {used})")
                continue
            problems += [f"{c.where}: {k} is not a key {c.binary} reads" for k in used if k not in allowed]
        return problems

    checks.run(f"{label} sets only IOTP_ keys the binaries read", check)


def check_deployed_once(checks: Checks, label: str, containers: list[Container]) -> None:
    checks.run(f"{label} runs each service once", lambda: [
        f"{b} runs {len(deployed(containers, b))} times" for b in SERVICES
        if len(deployed(containers, b)) != 1])


def check_topology_tool(checks: Checks, label: str, containers: list[Container], kind: str,
                        brokers: str | None) -> None:
    def check() -> list[str]:
        tools = [c for c in deployed(containers, "iotp-topology") if c.argv[1:2] == ["apply"]]
        if len(tools) != 1:
            return [f"{len(tools)} containers run `iotp-topology apply`, want 1"]
        argv, env = tools[0].argv, tools[0].env
        tool_brokers = flag(argv, "--brokers") or env.get("IOTP__KAFKA__BROKERS")
        problems = [] if tools[0].kind == kind else [f"{tools[0].where} is not a {kind}"]
        if tool_brokers != brokers:
            problems.append(f"it applies to Kafka {tool_brokers!r}, the services use {brokers!r}")
        if flag(argv, "--replication") is None:
            problems.append("no --replication (the default, 1, is for a single local broker)")
        if "--kafka-only" in argv:
            problems.append("--kafka-only skips the RabbitMQ dead-letter topology")
        return problems

    checks.run(f"{label} {kind} runs `iotp-topology apply` against the services' Kafka", check)


def service_brokers(containers: list[Container]) -> dict[str, Any]:
    return {c.where: c.env.get("IOTP__KAFKA__BROKERS") for c in service_containers(containers)}


def the_brokers(containers: list[Container]) -> str | None:
    """The one Kafka every service is configured with; None if they disagree."""
    values = set(service_brokers(containers).values())
    return values.pop() if len(values) == 1 else None


def check_one_kafka(checks: Checks, label: str, containers: list[Container]) -> None:
    found = service_brokers(containers)
    checks.run(f"{label} services all use one Kafka", lambda: (
        [f"IOTP__KAFKA__BROKERS is missing, unresolved or differs: {found}"]
        if None in found.values() or len(set(found.values())) != 1 else []))


def check_compose_services(checks: Checks, containers: list[Container]) -> None:
    services = service_containers(containers)
    topology_service = next((c.name for c in deployed(containers, "iotp-topology")), None)

    def start_order() -> list[str]:
        return [f"{c.where} does not wait for {topology_service!r} to complete successfully"
                for c in services
                if ((c.owner.get("depends_on") or {}).get(topology_service) or {}).get("condition")
                != "service_completed_successfully"]

    def identities() -> list[str]:
        replicas = [c.env.get("IOTP__COMMON__REPLICA") for c in services]
        ports = [p for c in services for p in c.owner.get("ports", [])
                 if str(p).endswith(f":{ADMIN_PORT}")]
        problems = [f"{c.where} has no IOTP__COMMON__REPLICA" for c in services
                    if not c.env.get("IOTP__COMMON__REPLICA")]
        if len(set(replicas)) != len(replicas):
            problems.append(f"replica names repeat: {replicas}")
        if len(ports) != len(services) or len({str(p).rsplit(":", 2)[-2] for p in ports}) != len(ports):
            problems.append(f"admin ports are not published once each on distinct host ports: {ports}")
        return problems

    def grace() -> list[str]:
        problems = []
        for c in services:
            deadline = seconds(c.env.get("IOTP__COMMON__SHUTDOWN_DEADLINE", DEFAULT_SHUTDOWN_DEADLINE))
            grace_s = seconds(c.owner.get("stop_grace_period", "10s"))  # Docker's default
            if grace_s <= deadline:
                problems.append(f"{c.where}: stop_grace_period {grace_s}s <= shutdown deadline {deadline}s")
        return problems

    checks.run("compose services start after the topology tool succeeded", start_order)
    checks.run("compose services have distinct replica names and admin host ports", identities)
    checks.run("compose stop_grace_period exceeds each shutdown deadline", grace)


def check_k8s_services(checks: Checks, k8s: K8s, containers: list[Container]) -> None:
    services = service_containers(containers)

    def identities() -> list[str]:
        problems = []
        for c in services:
            if c.owner["kind"] != "StatefulSet":
                problems.append(f"{c.where}: not a StatefulSet (replica names would not be stable)")
            elif c.owner["spec"].get("podManagementPolicy") != "Parallel":
                problems.append(f"{c.where}: podManagementPolicy is not Parallel")
            ref = (c.env.get("IOTP__COMMON__REPLICA") or {}).get("fieldRef", {}).get("fieldPath")
            if ref != "metadata.name":
                problems.append(f"{c.where}: IOTP__COMMON__REPLICA is not the pod name")
        return problems

    def pods() -> list[str]:
        problems = []
        pdb_selectors = [p["spec"]["selector"].get("matchLabels")
                         for p in k8s.of_kind("PodDisruptionBudget")]
        for c in services:
            template, spec = c.owner["spec"]["template"], c.spec
            pod = template["spec"]
            deadline = seconds(c.env.get("IOTP__COMMON__SHUTDOWN_DEADLINE", DEFAULT_SHUTDOWN_DEADLINE))
            if pod.get("terminationGracePeriodSeconds", 30) <= deadline:
                problems.append(f"{c.where}: terminationGracePeriodSeconds <= shutdown deadline {deadline}s")
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                get = (spec.get(probe) or {}).get("httpGet") or {}
                port = get.get("port")
                port = next((p["containerPort"] for p in spec.get("ports", [])
                             if p.get("name") == port), port)
                if get.get("path") != path or port != ADMIN_PORT:
                    problems.append(f"{c.where}: {probe} is not GET {path} on {ADMIN_PORT}")
            notes = template["metadata"].get("annotations", {})
            if (notes.get("prometheus.io/scrape") != "true"
                    or notes.get("prometheus.io/port") != str(ADMIN_PORT)):
                problems.append(f"{c.where}: no prometheus scrape annotations for port {ADMIN_PORT}")
            if not spec.get("resources", {}).get("limits", {}).get("memory"):
                problems.append(f"{c.where}: no memory limit")
            if not (spec.get("securityContext") or {}).get("readOnlyRootFilesystem"):
                problems.append(f"{c.where}: root filesystem is writable")
            if not (pod.get("securityContext") or {}).get("runAsNonRoot"):
                problems.append(f"{c.where}: runAsNonRoot is not set")
            labels = template["metadata"].get("labels", {})
            if not any(s and s.items() <= labels.items() for s in pdb_selectors):
                problems.append(f"{c.where}: no PodDisruptionBudget selects its pods")
        return problems

    checks.run("k8s services are StatefulSets named by pod (Parallel, downward API)", identities)
    checks.run("k8s service pods: probes, scraping, limits, hardening, grace, PDB", pods)


def check_kustomization(checks: Checks) -> None:
    def check() -> list[str]:
        base = ROOT / "k8s" / "base"
        kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
        listed = set(kustomization.get("resources", []))
        present = {p.name for p in base.glob("*.yaml")} - {"kustomization.yaml"}
        return ([f"{f} is not listed in kustomization.yaml" for f in sorted(present - listed)]
                + [f"kustomization.yaml lists missing {f}" for f in sorted(listed - present)])

    checks.run("k8s/base/kustomization.yaml lists every manifest", check)


def check_dead_letters(checks: Checks, label: str, containers: list[Container]) -> None:
    """Stages that dead-letter (and the bridge) must reach the RabbitMQ the topology tool declared:
    without it a rejected record is retried forever and its partition stops."""

    def check() -> list[str]:
        tools = deployed(containers, "iotp-topology")
        declared = [amqp_source(t, flag(t.argv, "--amqp") or t.env.get("IOTP_AMQP_URI"))
                    for t in tools]
        problems = []
        for c in service_containers(containers):
            keys = ([DEAD_LETTER_KEY, DEAD_LETTER_FILE_KEY] if DEAD_LETTER_KEY in ALLOWED_ENV[c.binary]
                    else ["IOTP__AMQP_URI", "IOTP_FILE__AMQP_URI"] if c.binary == DLQ_HANDLER
                    else BRIDGE_DEAD_LETTER_KEYS if c.binary == BRIDGE
                    else [])
            if not keys:
                continue
            literal, file = c.env.get(keys[0]), c.env.get(keys[1])
            used = amqp_source(c, literal) if literal is not None else secret_file_source(c, file)
            if used is None or [used] != declared:
                problems.append(f"{c.where}: its RabbitMQ ({keys[0]} or {keys[1]}) comes from "
                                f"{used}, the topology tool declares on {declared}")
        return problems

    checks.run(f"{label} dead-lettering stages use the RabbitMQ the topology tool declared", check)


def amqp_source(c: Container, value: Any) -> Any:
    """Where a URI comes from: a k8s Secret key, a compose variable (`${NAME…}`), or a literal."""
    if isinstance(value, dict) and "secretKeyRef" in value:
        ref = value["secretKeyRef"]
        return ("secret", ref["name"], ref["key"])
    match = re.fullmatch(r"\$\{(\w+)[^}]*\}", str(value)) if value is not None else None
    return ("variable", match[1]) if match else value


def secret_file_source(c: Container, path: Any) -> Any:
    """Where the file an IOTP_FILE__ variable names comes from: a compose secret's variable or
    a k8s Secret key mounted as a volume; None if the file is not provided by either."""
    if not isinstance(path, str):
        return None
    if c.kind == "service":
        name = path.removeprefix("/run/secrets/")
        source = (c.owner.get("_secrets") or {}).get(name) or {}
        listed = [s if isinstance(s, str) else s.get("source") for s in c.owner.get("secrets", [])]
        return ("variable", source["environment"]) if name in listed and "environment" in source else None
    pod = c.owner["spec"]["template"]["spec"]
    for mount in c.spec.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            volume = next((v for v in pod.get("volumes", []) if v["name"] == mount["name"]), {})
            if "secret" in volume:
                return ("secret", volume["secret"]["secretName"], path[len(prefix):])
    return None


def check_raw_topic(checks: Checks, label: str, containers: list[Container],
                    topology: dict[str, Any]) -> None:
    raw = [t["name"] for t in topology["kafka"]["topics"] if t["schema"] == "raw-envelope"]
    checks.run(f"{label} bridge writes to the raw-envelope topic {raw}", lambda: [
        f"{c.where}: IOTP__RAW_TOPIC is {c.env['IOTP__RAW_TOPIC']!r}"
        for c in deployed(containers, BRIDGE)
        if "IOTP__RAW_TOPIC" in c.env and [c.env["IOTP__RAW_TOPIC"]] != raw])


# ---------------------------------------------------------------------------------------------
# Mosquitto


def check_compose_mosquitto(checks: Checks, containers: list[Container], dev_text: str) -> None:
    """The compose broker must render dev/mosquitto.conf itself, not carry a copy."""

    def check() -> list[str]:
        brokers = [c for c in containers if "mosquitto -c" in " ".join(c.argv)
                   or c.argv[:1] == ["mosquitto"]]
        if len(brokers) != 1:
            return [f"{len(brokers)} compose services start mosquitto, want 1"]
        broker = brokers[0]
        script = " ".join(broker.argv)
        template = next((str(v).split(":")[1] for v in broker.owner.get("volumes", [])
                         if str(v).split(":")[0] in ("./dev/mosquitto.conf", "dev/mosquitto.conf")), None)
        if template is None:
            return [f"{broker.where} does not mount dev/mosquitto.conf"]
        render = re.search(r"sed((?:\s+-e\s+'s\|[^|']*\|[^|']*\|g?')+)\s+(\S+)\s*>\s*(\S+)", script)
        started = re.search(r"mosquitto\s+-c\s+(\S+)", script)
        if not render or render[2] != template or not started or started[1] != render[3]:
            return [f"{broker.where} does not `sed` {template} into the file `mosquitto -c` reads"]
        rendered = dev_text
        for old, new in re.findall(r"-e\s+'s\|([^|']*)\|([^|']*)\|g?'", render[1]):
            rendered = rendered.replace(old, new)
        settings = mosquitto_settings(rendered)
        problems = [f"placeholder left in rendered config: {p}"
                    for p in sorted(set(re.findall(r"@[A-Z]+@", rendered)))]
        problems += compare_mosquitto(settings, mosquitto_settings(dev_text))
        port = settings.get("listener", [""])[0].split(" ")[0]
        if not any(str(p).split(":")[-1] == port for p in broker.owner.get("ports", [])):
            problems.append(f"listener port {port} is not published")
        return problems + bridge_port_problems(containers, settings)

    checks.run("compose Mosquitto renders dev/mosquitto.conf (same sizing and persistence)", check)


def tls_problems(settings: dict[str, list[str]]) -> list[str]:
    problems = [f"{key} is {settings.get(key)}, want [{value!r}]"
                for key, value in MOSQUITTO_PRODUCTION.items() if settings.get(key) != [value]]
    return problems + [f"no {key}" for key in MOSQUITTO_TLS_FILES if key not in settings]


def acl_problems(acl: str) -> list[str]:
    lines = {line.strip() for line in acl.splitlines()}
    return [f"dev/mosquitto.acl lacks `{line}`" for line in MOSQUITTO_ACL_LINES if line not in lines]


def check_dev_tls_mosquitto(checks: Checks, dev_text: str, tls_text: str, dev_acl: str) -> None:
    """dev/mosquitto-tls.conf: dev/mosquitto.conf's sizing, mutual TLS, the CRL, the ACL."""

    def check() -> list[str]:
        settings = mosquitto_settings(tls_text)
        problems = compare_mosquitto(settings, mosquitto_settings(dev_text))
        problems += tls_problems(settings)
        if settings.get("acl_file") != ["@ACL@"]:
            problems.append(f"acl_file is {settings.get('acl_file')}, want ['@ACL@'] (dev/mosquitto.acl)")
        return problems + acl_problems(dev_acl)

    checks.run("dev/mosquitto-tls.conf: dev/mosquitto.conf sizing, TLS 1.2+, client certificates, CRL, ACL", check)


def check_k8s_mosquitto(checks: Checks, k8s: K8s, containers: list[Container], dev_text: str,
                        dev_acl: str) -> None:
    def mounted_file(broker: Container, path: str) -> str | None:
        """Contents of `path` if it comes from a ConfigMap volume of the broker's pod."""
        pod = broker.owner["spec"]["template"]["spec"]
        for mount in broker.spec.get("volumeMounts", []):
            if path.startswith(mount["mountPath"].rstrip("/") + "/"):
                volume = next(v for v in pod.get("volumes", []) if v["name"] == mount["name"])
                if "configMap" in volume:
                    key = path[len(mount["mountPath"].rstrip("/")) + 1:]
                    return k8s.config_value({"name": volume["configMap"]["name"], "key": key})
        return None

    def check() -> list[str]:
        brokers = [c for c in containers if c.binary == "mosquitto"]
        if len(brokers) != 1:
            return [f"{len(brokers)} k8s containers run mosquitto, want 1"]
        broker = brokers[0]
        if broker.owner["kind"] != "StatefulSet" or not broker.owner["spec"].get("volumeClaimTemplates"):
            return [f"{broker.where}: not a StatefulSet with a volume claim (persistence would be lost)"]
        config_path = flag(broker.argv, "-c")
        text = mounted_file(broker, config_path or "")
        if text is None:
            return [f"{broker.where}: config {config_path} does not come from a ConfigMap"]
        settings = mosquitto_settings(text)
        problems = compare_mosquitto(settings, mosquitto_settings(dev_text))
        problems += tls_problems(settings)
        acl_path = settings.get("acl_file", [""])[0]
        acl = mounted_file(broker, acl_path)
        if acl is None:
            problems.append(f"acl_file {acl_path!r} does not come from a ConfigMap")
        elif acl.strip() != dev_acl.strip():
            problems.append(f"the ACL in {acl_path} differs from dev/mosquitto.acl (copy it over)")
        problems += acl_problems(dev_acl)
        problems += bridge_port_problems(containers, settings)
        problems += [f"{c.where}: no {key} (the broker requires a client certificate)"
                     for c in deployed(containers, BRIDGE)
                     for key in ("IOTP__MQTT__TLS__CA_FILE", "IOTP__MQTT__TLS__CERT_FILE",
                                 "IOTP__MQTT__TLS__KEY_FILE") if key not in c.env]
        return problems

    checks.run("k8s Mosquitto config: dev/mosquitto.conf sizing and persistence, mutual TLS, CRL, "
               "the ACL of dev/mosquitto.acl", check)


# ---------------------------------------------------------------------------------------------


def load_compose(*files: str) -> dict[str, Any]:
    merged: Any = None
    for name in files:
        merged = compose_merge(merged, yaml.load((ROOT / name).read_text(), Loader=OverrideLoader))
    # The top-level secrets, where a service's secret file comes from.
    for svc in (merged.get("services") or {}).values():
        svc["_secrets"] = merged.get("secrets") or {}
    return merged


def without_internal(compose: dict[str, Any]) -> dict[str, Any]:
    return {**compose, "services": {name: {k: v for k, v in svc.items() if k != "_secrets"}
                                    for name, svc in compose["services"].items()}}


def main() -> int:
    checks = Checks()
    try:
        topology = tomllib.loads((ROOT / "schemas" / "topology.toml").read_text())
        composes = {"compose": load_compose("docker-compose.yml"),
                    "compose+embedded": load_compose("docker-compose.yml",
                                                     "docker-compose.embedded.yml")}
        overlays = {f"k8s {name}": K8s(ROOT / "k8s" / "overlays" / name) for name in ("dev", "prod")}
        dev_mosquitto = (ROOT / "dev" / "mosquitto.conf").read_text()
        dev_tls = (ROOT / "dev" / "mosquitto-tls.conf").read_text()
        dev_acl = (ROOT / "dev" / "mosquitto.acl").read_text()
    except (OSError, yaml.YAMLError, tomllib.TOMLDecodeError, subprocess.CalledProcessError) as e:
        print(f"FAIL reading the files: {e} {getattr(e, 'stderr', '')}")
        print("0 passed, 1 failed")
        return 1

    runs = []
    for label, compose in composes.items():
        print(f"== {label}")
        check_compose_schema(checks, without_internal(compose))
        containers = compose_containers(compose)
        runs.append((label, containers, "service", the_brokers(containers)))
        check_compose_services(checks, containers)
        check_compose_mosquitto(checks, containers, dev_mosquitto)
    check_kustomization(checks)
    for label, k8s in overlays.items():
        print(f"== {label}")
        brokers = the_brokers(k8s.containers)
        check_keda_schemas(checks, k8s)
        check_kafka_scaling(checks, k8s, topology, brokers)
        check_dlq_scaling(checks, k8s, topology)
        check_k8s_services(checks, k8s, k8s.containers)
        runs.append((label, k8s.containers, "Job", brokers))
    # Production Mosquitto: mutual TLS and the ACL (dev runs it without certificates).
    check_k8s_mosquitto(checks, overlays["k8s prod"], overlays["k8s prod"].containers, dev_mosquitto,
                        dev_acl)
    check_dev_tls_mosquitto(checks, dev_mosquitto, dev_tls, dev_acl)

    for label, containers, tool_kind, brokers in runs:
        print(f"== {label}: configuration")
        check_deployed_once(checks, label, containers)
        check_env_keys(checks, label, containers)
        check_one_kafka(checks, label, containers)
        check_topology_tool(checks, label, containers, tool_kind, brokers)
        check_dead_letters(checks, label, containers)
        check_raw_topic(checks, label, containers, topology)

    print(f"{checks.passed} passed, {checks.failed} failed")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())

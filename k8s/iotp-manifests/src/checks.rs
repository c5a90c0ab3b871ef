//! Cross-references of one overlay or Compose model, read as typed objects: every variable and
//! mounted file a container needs exists in a ConfigMap or Secret of the overlay, ScaledObjects
//! scale existing workloads on the consumer group and topic (or queue) the service really
//! uses, probes and Services hit the ports the service listens on, pods carry no API token,
//! and a PodMonitor scrapes every service on its admin port (`monitoring.rs`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::launch::{ExternalSecrets, Launch, Lookup};
use crate::objects::Object;

/// The admin port a service listens on: `IOTP__COMMON__ADMIN_LISTEN`, else the default of
/// `iotp_core::config::Common`.
pub fn admin_port(l: &Launch) -> Option<u16> {
    let listen = l.env.get("IOTP__COMMON__ADMIN_LISTEN").map(String::as_str);
    let default = iotp_core::config::Common::default().admin_listen;
    match listen {
        Some(v) => v.parse::<SocketAddr>().ok().map(|a| a.port()),
        None => Some(default.port()),
    }
}

/// Whether the launch runs one of the pipeline's services (not the topology tool or a broker).
pub fn is_service(l: &Launch) -> bool {
    SERVICES.contains(&l.binary())
}

/// The pipeline's service binaries.
pub const SERVICES: [&str; 6] = [
    "iotp-mqtt-bridge",
    "iotp-parser",
    "iotp-enricher",
    "iotp-upserter",
    "iotp-aggregator",
    "iotp-dlq-handler",
];

/// Problems shared by Compose and Kubernetes: references to nothing, files a setting names
/// that are not mounted, a readiness check on another port than the admin port, a dead-letter
/// API off loopback without its bearer token (the service would refuse to start).
pub fn launch_problems(launches: &[Launch]) -> Vec<String> {
    let mut out = Vec::new();
    for l in launches {
        out.extend(l.unresolved.iter().map(|u| format!("{}: {u}", l.source)));
        if !is_service(l) {
            continue;
        }
        for (key, value) in &l.env {
            let names_file = key.starts_with("IOTP_FILE__") || key.ends_with("_FILE");
            if names_file && !l.provides(Path::new(value)) {
                out.push(format!(
                    "{}: {key}={value}, a file nothing mounts",
                    l.source
                ));
            }
        }
        if let Some(registry) = l.env.get("IOTP__REGISTRY_FILE") {
            if l.frozen.iter().any(|f| f == Path::new(registry)) {
                out.push(format!(
                    "{}: the registry {registry} is mounted with subPath, which the kubelet never \
                     updates: registry changes would not reach the running service",
                    l.source
                ));
            }
        }
        let api = l.env.get("IOTP__API_LISTEN");
        let api_off_loopback = api
            .and_then(|v| v.parse::<SocketAddr>().ok())
            .is_some_and(|a| !a.ip().to_canonical().is_loopback());
        if api_off_loopback && !l.env.contains_key("IOTP__API_TOKEN_FILE") {
            out.push(format!(
                "{}: the dead-letter API listens on {} without IOTP__API_TOKEN_FILE (the service \
                 refuses to start: off loopback it needs a bearer token)",
                l.source,
                api.map(String::as_str).unwrap_or_default()
            ));
        }
        match (&l.readiness, admin_port(l)) {
            (Some((path, port)), Some(admin)) if path == "/readyz" && *port == admin => {}
            (r, admin) => out.push(format!(
                "{}: readiness check {r:?} is not GET /readyz on the admin port {admin:?}",
                l.source
            )),
        }
    }
    out
}

/// The consumer group and input topics a Kafka stage uses: its environment's
/// `IOTP__IO__GROUP` / `IOTP__IO__INPUT_TOPICS`, else `schemas/topology.toml` (what
/// `StageIo::for_service` reads).
pub fn consumer(l: &Launch) -> Option<(String, Vec<String>)> {
    let service = l.binary().strip_prefix("iotp-")?;
    let spec = iotp_contract::topology::topology().consumer(service)?;
    let group = l
        .env
        .get("IOTP__IO__GROUP")
        .cloned()
        .unwrap_or_else(|| spec.group.clone());
    let topics = match l.env.get("IOTP__IO__INPUT_TOPICS") {
        Some(v) => v
            .trim_matches(['[', ']'])
            .split(',')
            .map(|t| t.trim().trim_matches('"').to_string())
            .collect(),
        None => spec.topics.clone(),
    };
    Some((group, topics))
}

/// Every cross-reference problem of one rendered overlay.
pub fn overlay_problems(
    objects: &[Object],
    launches: &[Launch],
    external: ExternalSecrets,
) -> Vec<String> {
    let lookup = Lookup::new(objects, external);
    let mut out = launch_problems(launches);
    let by_name: BTreeMap<&str, Vec<&Launch>> =
        launches.iter().fold(BTreeMap::new(), |mut m, l| {
            m.entry(l.name.as_str()).or_default().push(l);
            m
        });
    let accounts: Vec<&str> = objects
        .iter()
        .filter_map(|o| match o {
            Object::ServiceAccount(s) => s.metadata.name.as_deref(),
            _ => None,
        })
        .collect();
    for o in objects {
        if let Some(w) = o.workload() {
            if w.pod.automount_service_account_token != Some(false) {
                out.push(format!("{}: mounts a service account token", o.id()));
            }
            match w.pod.service_account_name.as_deref() {
                Some(sa) if accounts.contains(&sa) => {}
                sa => out.push(format!(
                    "{}: service account {sa:?} is not in the overlay",
                    o.id()
                )),
            }
        }
        match o {
            Object::ScaledObject(so) => {
                out.extend(scaled_object(o.id(), so, objects, &by_name, &lookup))
            }
            Object::Service(svc) => out.extend(service(o.id(), svc, objects, launches)),
            _ => {}
        }
    }
    out.extend(crate::monitoring::scrape_problems(objects, launches));
    out
}

fn scaled_object(
    id: String,
    so: &crate::keda::ScaledObject,
    objects: &[Object],
    by_name: &BTreeMap<&str, Vec<&Launch>>,
    lookup: &Lookup<'_>,
) -> Vec<String> {
    let mut out = Vec::new();
    let target = &so.spec.scale_target_ref;
    let kind = target.kind.as_deref().unwrap_or("Deployment");
    let exists = objects
        .iter()
        .filter_map(Object::workload)
        .any(|w| w.kind == kind && w.name == target.name);
    let runs: Vec<&Launch> = by_name
        .get(target.name.as_str())
        .cloned()
        .unwrap_or_default();
    let Some(service) = runs.iter().find(|l| is_service(l)) else {
        return vec![format!(
            "{id}: scales {kind}/{}, which runs no pipeline service",
            target.name
        )];
    };
    if !exists {
        out.push(format!(
            "{id}: scaleTargetRef {kind}/{} does not exist",
            target.name
        ));
    }
    for t in &so.spec.triggers {
        let meta = |k: &str| t.metadata.get(k).cloned().unwrap_or_default();
        match t.kind.as_str() {
            "kafka" => match consumer(service) {
                Some((group, topics)) => {
                    if meta("consumerGroup") != group {
                        out.push(format!(
                            "{id}: consumerGroup {:?}, {} consumes as {group:?}",
                            meta("consumerGroup"),
                            service.binary()
                        ));
                    }
                    if topics != [meta("topic")] {
                        out.push(format!(
                            "{id}: topic {:?}, {} reads {topics:?}",
                            meta("topic"),
                            service.binary()
                        ));
                    }
                    if service.env.get("IOTP__KAFKA__BROKERS") != Some(&meta("bootstrapServers")) {
                        out.push(format!(
                            "{id}: bootstrapServers {:?} is not the service's Kafka {:?}",
                            meta("bootstrapServers"),
                            service.env.get("IOTP__KAFKA__BROKERS")
                        ));
                    }
                }
                None => out.push(format!(
                    "{id}: kafka trigger on {}, which consumes no Kafka topic",
                    service.binary()
                )),
            },
            "rabbitmq" => {
                let topo = &iotp_contract::topology::topology().rabbitmq;
                let queue = service
                    .env
                    .get("IOTP__RABBITMQ__INCOMING_QUEUE")
                    .unwrap_or(&topo.incoming_queue);
                if service.binary() != "iotp-dlq-handler" || &meta("queueName") != queue {
                    out.push(format!(
                        "{id}: queue {:?} on {}; the DLQ handler consumes {queue:?}",
                        meta("queueName"),
                        service.binary()
                    ));
                }
                let auth = t.authentication_ref.as_ref().map(|a| a.name.as_str());
                let found = objects.iter().find_map(|o| match o {
                    Object::TriggerAuthentication(a) if a.metadata.name.as_deref() == auth => {
                        Some(a)
                    }
                    _ => None,
                });
                match found {
                    None => out.push(format!(
                        "{id}: authenticationRef {auth:?} is not in the overlay"
                    )),
                    Some(a) => {
                        for r in &a.spec.secret_target_ref {
                            if !lookup
                                .secret_keys(&r.name)
                                .is_some_and(|k| k.contains_key(&r.key))
                            {
                                out.push(format!("{id}: TriggerAuthentication reads Secret {}/{}, not in the overlay", r.name, r.key));
                            }
                        }
                    }
                }
            }
            // The bridge has no consumer lag; it scales on the broker backlog it exports.
            "prometheus" => {
                let query = meta("query");
                if service.binary() != "iotp-mqtt-bridge"
                    || !query.contains("iotp_mqtt_broker_stored_messages")
                {
                    out.push(format!(
                        "{id}: prometheus trigger {query:?} on {}; only the bridge scales on the broker backlog it exports",
                        service.binary()
                    ));
                }
                if meta("serverAddress").is_empty() || meta("threshold").parse::<f64>().is_err() {
                    out.push(format!(
                        "{id}: prometheus trigger needs serverAddress and a numeric threshold"
                    ));
                }
            }
            other => out.push(format!(
                "{id}: trigger type {other} is not one this project uses"
            )),
        }
    }
    out
}

fn service(
    id: String,
    svc: &k8s_openapi::api::core::v1::Service,
    objects: &[Object],
    launches: &[Launch],
) -> Vec<String> {
    let Some(spec) = &svc.spec else {
        return vec![format!("{id}: no spec")];
    };
    let selector = spec.selector.clone().unwrap_or_default();
    let pods: Vec<_> = objects
        .iter()
        .filter_map(Object::workload)
        .filter(|w| w.kind == "StatefulSet")
        .filter(|w| {
            w.labels
                .is_some_and(|l| selector.iter().all(|(k, v)| l.get(k) == Some(v)))
        })
        .collect();
    if pods.is_empty() {
        return vec![format!("{id}: selects no pods")];
    }
    let mut out = Vec::new();
    for port in spec.ports.iter().flatten() {
        let target = port
            .target_port
            .clone()
            .unwrap_or(IntOrString::Int(port.port));
        for w in &pods {
            let found = w
                .pod
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| match &target {
                    IntOrString::Int(n) => p.container_port == *n,
                    IntOrString::String(name) => p.name.as_deref() == Some(name),
                });
            let Some(found) = found else {
                out.push(format!(
                    "{id}: targetPort {target:?} is no port of {}",
                    w.name
                ));
                continue;
            };
            // The port the service binds must be the one the Service forwards to.
            for l in launches
                .iter()
                .filter(|l| l.name == w.name && is_service(l))
            {
                let api = l
                    .env
                    .get("IOTP__API_LISTEN")
                    .and_then(|v| v.parse::<SocketAddr>().ok())
                    .map(|a| a.port());
                let listening = [admin_port(l), api];
                if !listening.contains(&u16::try_from(found.container_port).ok()) {
                    out.push(format!(
                        "{id}: forwards to port {}, where {} does not listen ({listening:?})",
                        found.container_port,
                        l.binary()
                    ));
                }
            }
        }
    }
    out
}

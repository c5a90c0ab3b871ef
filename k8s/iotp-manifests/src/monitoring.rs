//! prometheus-operator's custom resources as typed objects (monitoring.coreos.com/v1): the
//! `PrometheusRule` carrying the pipeline's alert rules and the `PodMonitor` that has the
//! cluster's Prometheus scrape every service (k8s/monitoring, a kustomize component). Only the
//! fields this project sets are typed, `deny_unknown_fields`, so a misspelt one fails to load.
//! The rules themselves are checked by `dev/check_monitoring.py` (promtool, the metric
//! catalogue, the same groups as k8s/monitoring/rules/iotp.rules.yml).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use serde::{Deserialize, Serialize};

use crate::checks::{admin_port, is_service};
use crate::launch::Launch;
use crate::objects::Object;

/// `PrometheusRule.spec`: rule groups, in Prometheus's rule file format.
#[derive(CustomResource, Debug, Clone, Serialize, Deserialize)]
#[kube(
    group = "monitoring.coreos.com",
    version = "v1",
    kind = "PrometheusRule",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrometheusRuleSpec {
    /// The rule groups.
    pub groups: Vec<RuleGroup>,
}

/// One rule group.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleGroup {
    /// Group name, unique in the file.
    pub name: String,
    /// Evaluation interval (Prometheus's global one when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Recording and alerting rules.
    pub rules: Vec<Rule>,
}

/// A recording rule (`record`) or an alerting rule (`alert`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Name of the series a recording rule writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
    /// Name of an alert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<String>,
    /// PromQL.
    pub expr: String,
    /// How long an alert's condition must hold before it fires.
    #[serde(default, rename = "for", skip_serializing_if = "Option::is_none")]
    pub for_: Option<String>,
    /// Labels added to the alert or the recorded series.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// An alert's annotations (templates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// `PodMonitor.spec`: which pods the Prometheus scrapes, on which port, with which labels.
#[derive(CustomResource, Debug, Clone, Serialize, Deserialize)]
#[kube(
    group = "monitoring.coreos.com",
    version = "v1",
    kind = "PodMonitor",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodMonitorSpec {
    /// The pods, in the PodMonitor's own namespace.
    pub selector: LabelSelector,
    /// How each selected pod is scraped.
    pub pod_metrics_endpoints: Vec<PodMetricsEndpoint>,
}

/// One scrape endpoint of the selected pods.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodMetricsEndpoint {
    /// Name of the container port.
    pub port: String,
    /// HTTP path (`/metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Scrape interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Keep the target's own labels on a clash (iotp_up carries `service` itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub honor_labels: Option<bool>,
    /// Relabelings before the scrape (the `job` and `service` labels the rules select on).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relabelings: Vec<Relabeling>,
}

/// A relabeling step (Prometheus's `relabel_config`, camelCased).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Relabeling {
    /// Labels whose values are joined and matched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_labels: Vec<String>,
    /// The label written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_label: Option<String>,
    /// The value written (`$1` by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacement: Option<String>,
    /// `replace` by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Matched against the joined source labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// With a PodMonitor in the overlay (the k8s/monitoring component): every service's pods are
/// selected by exactly one, which scrapes a container port the pod names and that is the
/// service's admin port, and labels the targets `job="iotp"` and `service=<pod label
/// app.kubernetes.io/name>`, what the alert rules and the dashboard select on.
pub fn scrape_problems(objects: &[Object], launches: &[Launch]) -> Vec<String> {
    let monitors: Vec<(String, &PodMonitor)> = objects
        .iter()
        .filter_map(|o| match o {
            Object::PodMonitor(m) => Some((o.id(), m)),
            _ => None,
        })
        .collect();
    if monitors.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (id, m) in &monitors {
        for e in &m.spec.pod_metrics_endpoints {
            let sets = |label: &str, source: Option<&str>, value: Option<&str>| {
                e.relabelings.iter().any(|r| {
                    r.target_label.as_deref() == Some(label)
                        && r.action.as_deref().unwrap_or("replace") == "replace"
                        && source.is_none_or(|s| r.source_labels == [s])
                        && value.is_none_or(|v| r.replacement.as_deref() == Some(v))
                })
            };
            if !sets("job", None, Some("iotp")) {
                out.push(format!(
                    "{id}: endpoint {} does not set job=\"iotp\"",
                    e.port
                ));
            }
            if !sets("service", Some(SERVICE_LABEL), None) {
                out.push(format!(
                    "{id}: endpoint {} does not set service from {SERVICE_LABEL}",
                    e.port
                ));
            }
        }
    }
    for w in objects.iter().filter_map(Object::workload) {
        let Some(service) = launches.iter().find(|l| l.name == w.name && is_service(l)) else {
            continue;
        };
        let empty = BTreeMap::new();
        let labels = w.labels.unwrap_or(&empty);
        let selecting: Vec<&(String, &PodMonitor)> = monitors
            .iter()
            .filter(|(_, m)| selects(&m.spec.selector, labels))
            .collect();
        let [(id, m)] = selecting.as_slice() else {
            out.push(format!(
                "{} {}: selected by {} PodMonitors, want 1",
                w.kind,
                w.name,
                selecting.len()
            ));
            continue;
        };
        let ports: Vec<(&str, i32)> = w
            .pod
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| Some((p.name.as_deref()?, p.container_port)))
            .collect();
        let admin = admin_port(service).map(i32::from);
        for e in &m.spec.pod_metrics_endpoints {
            match ports.iter().find(|(name, _)| *name == e.port) {
                Some((_, number)) if Some(*number) == admin => {}
                Some((_, number)) => out.push(format!(
                    "{id}: scrapes {} {} on port {number}, not its admin port {admin:?}",
                    w.kind, w.name
                )),
                None => out.push(format!(
                    "{id}: scrapes port {:?}, which {} {} does not name",
                    e.port, w.kind, w.name
                )),
            }
        }
    }
    out
}

/// The pod label naming the service (`app.kubernetes.io/name`), as a scrape meta label.
const SERVICE_LABEL: &str = "__meta_kubernetes_pod_label_app_kubernetes_io_name";

/// Whether `selector` selects pods labelled `labels` (matchLabels; matchExpressions are not
/// used here, and a selector with them is taken as selecting nothing).
fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    selector
        .match_expressions
        .as_ref()
        .is_none_or(Vec::is_empty)
        && selector
            .match_labels
            .iter()
            .flatten()
            .all(|(k, v)| labels.get(k) == Some(v))
}

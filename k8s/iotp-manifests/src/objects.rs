//! An overlay as typed Kubernetes objects: `kubectl kustomize k8s/overlays/NAME`, each document
//! loaded as the `k8s-openapi` type (or the KEDA or prometheus-operator custom resource) its
//! apiVersion and kind name.
//! A kind this project does not use is an error, and so is a field the typed object does not
//! have (it would be dropped by the API server, or refused by `kubectl apply --validate=strict`):
//! every document must survive a typed round trip unchanged.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PodSpec, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use serde::de::DeserializeOwned;
use serde::{Deserialize as _, Serialize};
use serde_json::Value;

use crate::keda::{ScaledObject, TriggerAuthentication};
use crate::monitoring::{PodMonitor, PrometheusRule};

/// One object of an overlay.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Object {
    /// v1 Namespace.
    Namespace(Namespace),
    /// v1 ServiceAccount.
    ServiceAccount(ServiceAccount),
    /// v1 ConfigMap.
    ConfigMap(ConfigMap),
    /// v1 Secret.
    Secret(Secret),
    /// v1 Service.
    Service(Service),
    /// apps/v1 StatefulSet.
    StatefulSet(StatefulSet),
    /// batch/v1 Job.
    Job(Job),
    /// policy/v1 PodDisruptionBudget.
    PodDisruptionBudget(PodDisruptionBudget),
    /// networking.k8s.io/v1 NetworkPolicy.
    NetworkPolicy(NetworkPolicy),
    /// keda.sh/v1alpha1 ScaledObject.
    ScaledObject(ScaledObject),
    /// keda.sh/v1alpha1 TriggerAuthentication.
    TriggerAuthentication(TriggerAuthentication),
    /// monitoring.coreos.com/v1 PrometheusRule.
    PrometheusRule(PrometheusRule),
    /// monitoring.coreos.com/v1 PodMonitor.
    PodMonitor(PodMonitor),
}

/// A workload: something that runs pods.
#[derive(Debug, Clone)]
pub struct Workload<'a> {
    /// `StatefulSet` or `Job`.
    pub kind: &'static str,
    /// Its name.
    pub name: &'a str,
    /// The pod template's labels.
    pub labels: Option<&'a std::collections::BTreeMap<String, String>>,
    /// The pod template's spec.
    pub pod: &'a PodSpec,
    /// Names of the StatefulSet's volume claim templates (volumes of their own).
    pub claims: Vec<&'a str>,
}

impl Object {
    /// `Kind/name`.
    pub fn id(&self) -> String {
        let (kind, name) = match self {
            Object::Namespace(o) => ("Namespace", &o.metadata.name),
            Object::ServiceAccount(o) => ("ServiceAccount", &o.metadata.name),
            Object::ConfigMap(o) => ("ConfigMap", &o.metadata.name),
            Object::Secret(o) => ("Secret", &o.metadata.name),
            Object::Service(o) => ("Service", &o.metadata.name),
            Object::StatefulSet(o) => ("StatefulSet", &o.metadata.name),
            Object::Job(o) => ("Job", &o.metadata.name),
            Object::PodDisruptionBudget(o) => ("PodDisruptionBudget", &o.metadata.name),
            Object::NetworkPolicy(o) => ("NetworkPolicy", &o.metadata.name),
            Object::ScaledObject(o) => ("ScaledObject", &o.metadata.name),
            Object::TriggerAuthentication(o) => ("TriggerAuthentication", &o.metadata.name),
            Object::PrometheusRule(o) => ("PrometheusRule", &o.metadata.name),
            Object::PodMonitor(o) => ("PodMonitor", &o.metadata.name),
        };
        format!("{kind}/{}", name.as_deref().unwrap_or(""))
    }

    /// The workload this object is, if it runs pods.
    pub fn workload(&self) -> Option<Workload<'_>> {
        let (kind, meta, template, claims) = match self {
            Object::StatefulSet(o) => {
                let spec = o.spec.as_ref()?;
                let claims = spec.volume_claim_templates.iter().flatten();
                let claims = claims.filter_map(|c| c.metadata.name.as_deref()).collect();
                ("StatefulSet", &o.metadata, &spec.template, claims)
            }
            Object::Job(o) => ("Job", &o.metadata, &o.spec.as_ref()?.template, Vec::new()),
            _ => return None,
        };
        Some(Workload {
            kind,
            name: meta.name.as_deref().unwrap_or(""),
            labels: template.metadata.as_ref().and_then(|m| m.labels.as_ref()),
            pod: template.spec.as_ref()?,
            claims,
        })
    }
}

/// Render `overlay` with `kubectl kustomize` and load every object typed.
pub fn render(overlay: &Path) -> anyhow::Result<Vec<Object>> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(overlay)
        .output()
        .context("cannot run `kubectl kustomize` (is kubectl installed?)")?;
    if !out.status.success() {
        bail!(
            "kubectl kustomize {} failed: {}",
            overlay.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    load(&String::from_utf8(out.stdout)?)
}

/// Load every document of a multi-document YAML stream as a typed object.
pub fn load(yaml: &str) -> anyhow::Result<Vec<Object>> {
    let mut objects = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = Value::deserialize(doc)?;
        if value.is_null() {
            continue;
        }
        objects.push(typed(value)?);
    }
    Ok(objects)
}

fn typed(mut value: Value) -> anyhow::Result<Object> {
    // kustomize wraps long base64 values over lines; the API server's decoder skips the
    // line breaks, k8s-openapi's does not.
    if value["kind"] == "Secret" {
        if let Some(data) = value.get_mut("data").and_then(Value::as_object_mut) {
            for v in data.values_mut() {
                if let Some(s) = v.as_str() {
                    *v = Value::String(s.split_whitespace().collect());
                }
            }
        }
    }
    let api_version = value["apiVersion"].as_str().unwrap_or_default().to_string();
    let kind = value["kind"].as_str().unwrap_or_default().to_string();
    let name = value["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let object = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => strict(&value).map(Object::Namespace),
        ("v1", "ServiceAccount") => strict(&value).map(Object::ServiceAccount),
        ("v1", "ConfigMap") => strict(&value).map(Object::ConfigMap),
        ("v1", "Secret") => strict(&value).map(Object::Secret),
        ("v1", "Service") => strict(&value).map(Object::Service),
        ("apps/v1", "StatefulSet") => strict(&value).map(Object::StatefulSet),
        ("batch/v1", "Job") => strict(&value).map(Object::Job),
        ("policy/v1", "PodDisruptionBudget") => strict(&value).map(Object::PodDisruptionBudget),
        ("networking.k8s.io/v1", "NetworkPolicy") => strict(&value).map(Object::NetworkPolicy),
        ("keda.sh/v1alpha1", "ScaledObject") => strict(&value).map(Object::ScaledObject),
        ("keda.sh/v1alpha1", "TriggerAuthentication") => {
            strict(&value).map(Object::TriggerAuthentication)
        }
        ("monitoring.coreos.com/v1", "PrometheusRule") => {
            strict(&value).map(Object::PrometheusRule)
        }
        ("monitoring.coreos.com/v1", "PodMonitor") => strict(&value).map(Object::PodMonitor),
        _ => bail!("{api_version} {kind}/{name}: a kind this project does not deploy"),
    };
    object.with_context(|| format!("{kind}/{name}"))
}

/// `value` as `T`, refusing fields `T` does not have.
fn strict<T: DeserializeOwned + Serialize>(value: &Value) -> anyhow::Result<T> {
    let typed: T = serde_json::from_value(value.clone())?;
    let back = serde_json::to_value(&typed)?;
    let mut lost = Vec::new();
    dropped(value, &back, String::new(), &mut lost);
    if !lost.is_empty() {
        bail!("fields the typed object does not have: {}", lost.join(", "));
    }
    Ok(typed)
}

/// Paths in `original` that are missing from `back` (a typed round trip of it).
fn dropped(original: &Value, back: &Value, path: String, out: &mut Vec<String>) {
    match (original, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let here = format!("{path}.{key}");
                match b.get(key) {
                    Some(v) => dropped(value, v, here, out),
                    // An empty value the type leaves out serializes to nothing.
                    None if value.is_null() || value == &Value::Object(Default::default()) => {}
                    None => out.push(here),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                dropped(x, y, format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

//! KEDA's custom resources as typed objects: the fields of `ScaledObject` and
//! `TriggerAuthentication` (keda.sh/v1alpha1) this project sets, checked against KEDA's CRD
//! schemas by `dev/check_manifests.py`. Fields are `deny_unknown_fields` where this project
//! writes every field it may use, so a misspelt one fails to load.

use std::collections::BTreeMap;

use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// `ScaledObject.spec`: what KEDA scales, between which bounds, on which triggers.
#[derive(CustomResource, Debug, Clone, Serialize, Deserialize)]
#[kube(
    group = "keda.sh",
    version = "v1alpha1",
    kind = "ScaledObject",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScaledObjectSpec {
    /// The workload KEDA's HPA scales.
    pub scale_target_ref: ScaleTargetRef,
    /// Fewest replicas.
    #[serde(default)]
    pub min_replica_count: Option<i32>,
    /// Most replicas (KEDA's default is 100).
    #[serde(default)]
    pub max_replica_count: Option<i32>,
    /// HPA tuning (behavior), passed through.
    #[serde(default)]
    pub advanced: Option<serde_json::Value>,
    /// What the replica count follows.
    pub triggers: Vec<ScaleTrigger>,
}

/// `scaleTargetRef`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScaleTargetRef {
    /// Target's API version (`apps/v1`).
    #[serde(default)]
    pub api_version: Option<String>,
    /// Target's kind; KEDA's default is `Deployment`.
    #[serde(default)]
    pub kind: Option<String>,
    /// Target's name.
    pub name: String,
}

/// One trigger: its type (`kafka`, `rabbitmq`) and that scaler's metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScaleTrigger {
    /// Scaler type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The scaler's settings (all strings, as KEDA wants them).
    pub metadata: BTreeMap<String, String>,
    /// Credentials for the scaler.
    #[serde(default)]
    pub authentication_ref: Option<AuthenticationRef>,
}

/// `authenticationRef`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthenticationRef {
    /// A TriggerAuthentication in the same namespace.
    pub name: String,
}

/// `TriggerAuthentication.spec`: scaler parameters taken from Secrets.
#[derive(CustomResource, Debug, Clone, Serialize, Deserialize)]
#[kube(
    group = "keda.sh",
    version = "v1alpha1",
    kind = "TriggerAuthentication",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TriggerAuthenticationSpec {
    /// Parameters read from Secret keys.
    #[serde(default)]
    pub secret_target_ref: Vec<SecretTargetRef>,
}

/// One parameter from one Secret key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretTargetRef {
    /// Scaler parameter (`host` for RabbitMQ's URI).
    pub parameter: String,
    /// Secret name.
    pub name: String,
    /// Key in the Secret.
    pub key: String,
}

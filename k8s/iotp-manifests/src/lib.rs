//! The deployment manifests as the cluster and Compose would read them, checked against the
//! code: `k8s/overlays/*` rendered by `kubectl kustomize` and loaded as typed `k8s-openapi`
//! objects (KEDA's and prometheus-operator's resources as typed custom resources), `docker-compose.yml` merged with its
//! override; then cross-references ([`checks`]) and, in `tests/boot.rs`, every service binary
//! started with exactly the configuration its manifest gives it ([`boot`]).

pub mod boot;
pub mod checks;
pub mod compose;
pub mod keda;
pub mod launch;
pub mod monitoring;
pub mod objects;

use std::path::{Path, PathBuf};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

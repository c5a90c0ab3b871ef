//! What a manifest gives one container, in one shape for Kubernetes and Compose: its
//! program and arguments, its environment with every reference resolved, the files mounted
//! into it (ConfigMap and Secret keys, Compose secrets and bind-mounted files) and its
//! writable volumes. Built from an overlay's typed objects or from the merged Compose file;
//! the cross-reference checks and the boot test both read this.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Secret};

use crate::objects::{Object, Workload};

/// One container as its manifest starts it.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Where it is declared (`k8s dev StatefulSet/parser`, `compose service parser`).
    pub source: String,
    /// The workload or Compose service name.
    pub name: String,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Environment, every reference resolved to its value.
    pub env: BTreeMap<String, String>,
    /// Files mounted read-only: path in the container → contents.
    pub files: BTreeMap<PathBuf, Vec<u8>>,
    /// Writable directories: path in the container → volume id. Containers that mount the
    /// same id share the directory.
    pub dirs: BTreeMap<PathBuf, String>,
    /// The readiness check: HTTP path and container port.
    pub readiness: Option<(String, u16)>,
    /// References that point at nothing in the manifest (a missing ConfigMap, Secret or key).
    pub unresolved: Vec<String>,
    /// Files mounted with `subPath`: the kubelet never updates them after the pod starts.
    pub frozen: Vec<PathBuf>,
}

impl Launch {
    /// The program's file name (`iotp-parser`).
    pub fn binary(&self) -> &str {
        self.argv
            .first()
            .map(|a| a.rsplit('/').next().unwrap_or(a))
            .unwrap_or_default()
    }

    /// Whether `path` (in the container) is a mounted file or lies in a mounted directory.
    pub fn provides(&self, path: &Path) -> bool {
        self.files.contains_key(path) || self.dirs.keys().any(|d| path.starts_with(d))
    }
}

/// Secrets an overlay does not carry: the operator creates them (`k8s/overlays/prod`).
pub type ExternalSecrets = &'static [(&'static str, &'static [&'static str])];

/// The Secrets and keys `k8s/overlays/prod/kustomization.yaml` tells the operator to create.
pub const PROD_SECRETS: ExternalSecrets = &[
    ("iotp-rabbitmq", &["uri"]),
    ("iotp-mongodb", &["uri"]),
    ("iotp-dlq-api", &["token"]),
    (
        "mosquitto-tls",
        &["ca.crt", "tls.crt", "tls.key", "crl.pem"],
    ),
    ("mqtt-bridge-tls", &["ca.crt", "tls.crt", "tls.key"]),
];

/// Looks ConfigMap and Secret keys up in one overlay.
pub struct Lookup<'a> {
    objects: &'a [Object],
    external: ExternalSecrets,
}

impl<'a> Lookup<'a> {
    /// Over `objects`, with `external` Secrets assumed to exist (values unknown).
    pub fn new(objects: &'a [Object], external: ExternalSecrets) -> Self {
        Self { objects, external }
    }

    fn config_map(&self, name: &str) -> Option<&'a ConfigMap> {
        self.objects.iter().find_map(|o| match o {
            Object::ConfigMap(c) if c.metadata.name.as_deref() == Some(name) => Some(c),
            _ => None,
        })
    }

    fn secret(&self, name: &str) -> Option<&'a Secret> {
        self.objects.iter().find_map(|o| match o {
            Object::Secret(s) if s.metadata.name.as_deref() == Some(name) => Some(s),
            _ => None,
        })
    }

    /// The keys of ConfigMap `name` and their values.
    pub fn config_map_keys(&self, name: &str) -> Option<BTreeMap<String, Vec<u8>>> {
        let c = self.config_map(name)?;
        let mut out: BTreeMap<String, Vec<u8>> = c
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
            .collect();
        out.extend(
            c.binary_data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.0.clone())),
        );
        Some(out)
    }

    /// The keys of Secret `name` and their (decoded) values; an external Secret's keys have
    /// a placeholder value.
    pub fn secret_keys(&self, name: &str) -> Option<BTreeMap<String, Vec<u8>>> {
        if let Some(s) = self.secret(name) {
            let mut out: BTreeMap<String, Vec<u8>> = s
                .data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect();
            out.extend(
                s.string_data
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.clone().into_bytes())),
            );
            return Some(out);
        }
        let (_, keys) = self.external.iter().find(|(n, _)| *n == name)?;
        Some(
            keys.iter()
                .map(|k| (k.to_string(), format!("<external {name}/{k}>").into_bytes()))
                .collect(),
        )
    }
}

/// The launches of every container (init containers first) of every workload in `objects`.
pub fn from_overlay(label: &str, objects: &[Object], external: ExternalSecrets) -> Vec<Launch> {
    let lookup = Lookup::new(objects, external);
    let mut out = Vec::new();
    for workload in objects.iter().filter_map(Object::workload) {
        let pod = workload.pod;
        for c in pod.init_containers.iter().flatten().chain(&pod.containers) {
            out.push(container(label, &workload, c, &lookup));
        }
    }
    out
}

fn container(label: &str, w: &Workload<'_>, c: &Container, lookup: &Lookup<'_>) -> Launch {
    let mut l = Launch {
        source: format!("k8s {label} {}/{} container {}", w.kind, w.name, c.name),
        name: w.name.to_string(),
        ..Launch::default()
    };
    // A StatefulSet's first pod; what `metadata.name` is for the downward API.
    let pod_name = match w.kind {
        "StatefulSet" => format!("{}-0", w.name),
        _ => format!("{}-xxxxx", w.name),
    };
    for e in c.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            Some(v.clone())
        } else if let Some(from) = &e.value_from {
            if let Some(f) = &from.field_ref {
                (f.field_path == "metadata.name").then(|| pod_name.clone())
            } else if let Some(r) = &from.config_map_key_ref {
                let v = lookup
                    .config_map_keys(&r.name)
                    .and_then(|m| m.get(&r.key).cloned());
                v.map(|b| String::from_utf8_lossy(&b).into_owned())
            } else if let Some(r) = &from.secret_key_ref {
                let v = lookup
                    .secret_keys(&r.name)
                    .and_then(|m| m.get(&r.key).cloned());
                v.map(|b| String::from_utf8_lossy(&b).into_owned())
            } else {
                None
            }
        } else {
            Some(String::new())
        };
        match value {
            Some(v) => {
                l.env.insert(e.name.clone(), v);
            }
            None => l.unresolved.push(format!(
                "env {} refers to nothing in the overlay ({:?})",
                e.name, e.value_from
            )),
        }
    }
    // $(VAR) in command and args is the kubelet's expansion from the container's environment.
    let expand = |a: &String| {
        let mut a = a.clone();
        for (k, v) in &l.env {
            a = a.replace(&format!("$({k})"), v);
        }
        a
    };
    l.argv = c
        .command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .map(expand)
        .collect();
    for m in c.volume_mounts.iter().flatten() {
        let mount = PathBuf::from(&m.mount_path);
        let Some(v) = pod_volume(w, &m.name) else {
            if w.claims.contains(&m.name.as_str()) {
                l.dirs.insert(mount, format!("{}/{}", w.name, m.name));
            } else {
                l.unresolved
                    .push(format!("volumeMount {} names no volume", m.name));
            }
            continue;
        };
        let keys = if let Some(cm) = &v.config_map {
            Some((
                lookup.config_map_keys(&cm.name),
                &cm.items,
                "ConfigMap",
                cm.name.clone(),
            ))
        } else if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            Some((lookup.secret_keys(&name), &s.items, "Secret", name))
        } else {
            None
        };
        match keys {
            Some((Some(data), items, _, _)) => {
                let mount = match &m.sub_path {
                    Some(sub) => {
                        // One key mounted as the file itself.
                        if let Some(b) = data.get(sub) {
                            l.files.insert(mount.clone(), b.clone());
                            l.frozen.push(mount.clone());
                        }
                        continue;
                    }
                    None => mount,
                };
                for (key, bytes) in &data {
                    let path = match items {
                        Some(items) => match items.iter().find(|i| &i.key == key) {
                            Some(i) => i.path.clone(),
                            None => continue,
                        },
                        None => key.clone(),
                    };
                    l.files.insert(mount.join(path), bytes.clone());
                }
            }
            Some((None, _, kind, name)) => l.unresolved.push(format!(
                "volume {} mounts {kind} {name}, not in the overlay",
                m.name
            )),
            None => {
                // emptyDir and volume claims are per pod.
                l.dirs.insert(mount, format!("{}/{}", w.name, m.name));
            }
        }
    }
    if let Some(get) = c.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()) {
        use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
        let port = match &get.port {
            IntOrString::Int(p) => Some(*p),
            IntOrString::String(name) => c
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .map(|p| p.container_port),
        };
        match port.and_then(|p| u16::try_from(p).ok()) {
            Some(port) => l.readiness = Some((get.path.clone().unwrap_or_default(), port)),
            None => l.unresolved.push(format!(
                "readinessProbe port {:?} is no container port",
                get.port
            )),
        }
    }
    l
}

fn pod_volume<'a>(w: &Workload<'a>, name: &str) -> Option<&'a k8s_openapi::api::core::v1::Volume> {
    w.pod.volumes.iter().flatten().find(|v| v.name == name)
}

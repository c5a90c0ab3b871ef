//! The device registry: device profiles (metrics, canonical units, valid ranges) and devices
//! (tenant, site, asset, profile, firmware, personal-data fields). Loaded from a TOML file;
//! [`RegistryHandle`] reloads it when the file changes, without a restart.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use serde::Deserialize;

/// The maps looked up for every message (device, profile, metric): foldhash instead of SipHash.
/// Their keys come from the operator's registry file, not from devices, so a device cannot
/// pick colliding keys; a lookup of an unknown key costs the same as any other.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// [`FastMap`]'s set: for keys that name registered things (a device past the enricher).
pub type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

/// One metric of a profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    /// Canonical unit (UCUM-style code, e.g. `Wh`, `Cel`).
    pub unit: String,
    /// Smallest valid value, in the canonical unit.
    pub min: f64,
    /// Largest valid value, in the canonical unit.
    pub max: f64,
    /// A cumulative counter (energy meters): roll-ups report its delta.
    #[serde(default)]
    pub cumulative: bool,
}

/// A device profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Metrics by name.
    pub metrics: FastMap<String, MetricSpec>,
    /// Expected heartbeat interval in seconds, if the device sends heartbeats.
    #[serde(default)]
    pub heartbeat_secs: Option<u64>,
}

/// A registered device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// Tenant.
    pub tenant: String,
    /// Device id.
    pub id: String,
    /// Profile id.
    pub profile: String,
    /// Site.
    #[serde(default)]
    pub site: Option<String>,
    /// Asset.
    #[serde(default)]
    pub asset: Option<String>,
    /// Firmware the registry knows.
    #[serde(default)]
    pub firmware: Option<String>,
    /// Configuration version deployed to the device.
    #[serde(default)]
    pub config_version: Option<String>,
    /// Metrics that carry personal data: masked by the enricher.
    #[serde(default)]
    pub pii: Vec<String>,
    /// Extra tags.
    #[serde(default)]
    pub tags: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    profiles: FastMap<String, Profile>,
    #[serde(default)]
    devices: Vec<Device>,
}

/// A loaded registry.
#[derive(Debug, Default)]
pub struct Registry {
    profiles: FastMap<String, Profile>,
    /// Tenant → device id → device: looked up by `&str`, without building a key per message.
    devices: FastMap<String, FastMap<String, Device>>,
    count: usize,
}

/// Why a registry could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Unreadable file.
    #[error("cannot read registry {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Bad content.
    #[error("invalid registry {path}: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl Registry {
    /// Parse registry TOML.
    pub fn parse(text: &str, path: &Path) -> Result<Self, RegistryError> {
        let invalid = |message: String| RegistryError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let file: RegistryFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut devices: FastMap<String, FastMap<String, Device>> = FastMap::default();
        let mut count = 0;
        for d in file.devices {
            if !file.profiles.contains_key(&d.profile) {
                return Err(invalid(format!(
                    "device {}/{} names unknown profile {}",
                    d.tenant, d.id, d.profile
                )));
            }
            for (name, m) in file.profiles[&d.profile].metrics.iter() {
                if m.min > m.max {
                    return Err(invalid(format!(
                        "profile {} metric {name}: min > max",
                        d.profile
                    )));
                }
            }
            let tenant = devices.entry(d.tenant.clone()).or_default();
            if tenant.insert(d.id.clone(), d).is_none() {
                count += 1;
            }
        }
        Ok(Self {
            profiles: file.profiles,
            devices,
            count,
        })
    }

    /// Load from a file.
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// A device and its profile.
    pub fn device(&self, tenant: &str, device_id: &str) -> Option<(&Device, &Profile)> {
        let device = self.devices.get(tenant)?.get(device_id)?;
        Some((device, self.profiles.get(&device.profile)?))
    }

    /// Names of metrics that some profile marks cumulative.
    pub fn cumulative_metrics(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .profiles
            .values()
            .flat_map(|p| {
                p.metrics
                    .iter()
                    .filter(|(_, m)| m.cumulative)
                    .map(|(n, _)| n.clone())
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.count
    }

    /// No devices?
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// A registry shared by a stage, reloaded when its file's modification time changes.
#[derive(Clone)]
pub struct RegistryHandle {
    path: PathBuf,
    inner: Arc<RwLock<(Arc<Registry>, Option<SystemTime>)>>,
}

impl RegistryHandle {
    /// Load `path` now; fails if it cannot.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let registry = Registry::load(path)?;
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        Ok(Self {
            path: path.to_path_buf(),
            inner: Arc::new(RwLock::new((Arc::new(registry), mtime))),
        })
    }

    /// The current registry.
    pub fn current(&self) -> Arc<Registry> {
        match self.inner.read() {
            Ok(g) => g.0.clone(),
            Err(p) => p.into_inner().0.clone(),
        }
    }

    /// Reload if the file changed. A broken new file is reported and the old registry kept.
    pub fn reload_if_changed(&self) -> Result<bool, RegistryError> {
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let known = self.inner.read().map(|g| g.1).unwrap_or(None);
        if mtime == known {
            return Ok(false);
        }
        let registry = Registry::load(&self.path)?;
        if let Ok(mut g) = self.inner.write() {
            *g = (Arc::new(registry), mtime);
        }
        Ok(true)
    }
}

/// Factor and offset to turn `value` in `from` into `to` (`to = value * factor + offset`).
pub fn unit_conversion(from: &str, to: &str) -> Option<(f64, f64)> {
    if from == to {
        return Some((1.0, 0.0));
    }
    Some(match (from, to) {
        ("kWh", "Wh") => (1000.0, 0.0),
        ("MWh", "Wh") => (1_000_000.0, 0.0),
        ("Wh", "kWh") => (0.001, 0.0),
        ("kW", "W") => (1000.0, 0.0),
        ("W", "kW") => (0.001, 0.0),
        ("mV", "V") => (0.001, 0.0),
        ("[degF]", "Cel") => (5.0 / 9.0, -32.0 * 5.0 / 9.0),
        ("K", "Cel") => (1.0, -273.15),
        ("Cel", "K") => (1.0, 273.15),
        ("in/s", "mm/s") => (25.4, 0.0),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[profiles.climate-v1]
heartbeat_secs = 60
metrics = { temperature = { unit = "Cel", min = -40.0, max = 85.0 }, humidity = { unit = "%RH", min = 0.0, max = 100.0 } }

[[devices]]
tenant = "acme"
id = "t-1"
profile = "climate-v1"
site = "plant-1"
pii = ["location"]
"#;

    #[test]
    fn parses_and_looks_up() {
        let r = Registry::parse(SAMPLE, Path::new("x.toml")).expect("parse");
        let (d, p) = r.device("acme", "t-1").expect("device");
        assert_eq!(d.site.as_deref(), Some("plant-1"));
        assert_eq!(p.metrics["temperature"].unit, "Cel");
        assert!(r.device("acme", "t-2").is_none());
        assert!(r.device("other", "t-1").is_none());
    }

    #[test]
    fn unknown_profile_is_an_error() {
        let bad = SAMPLE.replace("profile = \"climate-v1\"", "profile = \"nope\"");
        assert!(Registry::parse(&bad, Path::new("x.toml")).is_err());
    }

    #[test]
    fn conversions() {
        let (f, o) = unit_conversion("[degF]", "Cel").expect("degF");
        assert!((212.0 * f + o - 100.0).abs() < 1e-9);
        assert_eq!(unit_conversion("kWh", "Wh"), Some((1000.0, 0.0)));
        assert_eq!(unit_conversion("Wh", "Cel"), None);
    }
}

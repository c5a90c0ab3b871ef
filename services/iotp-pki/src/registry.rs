//! Registering a device in the registry TOML the parser, enricher and aggregator read
//! (`iotp_contract::devices::Registry`), keeping the file's comments and layout.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use iotp_contract::devices::Registry;
use toml_edit::{value, ArrayOfTables, DocumentMut, Item, Table};

use crate::{check_name, write_atomic, PkiError};

/// What `register_device` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// The device was added.
    Added,
    /// The registry had it already; the file is unchanged.
    AlreadyThere,
}

/// Add `[[devices]] tenant, id, profile[, site]` to the existing registry at `path`. The
/// result must parse as a registry (the profile must exist) or the file is left as it was.
pub fn register_device(
    path: &Path,
    tenant: &str,
    device: &str,
    profile: &str,
    site: Option<&str>,
) -> Result<Registration, PkiError> {
    match plan(path, tenant, device, profile, site)? {
        None => Ok(Registration::AlreadyThere),
        Some(out) => {
            let mode = std::fs::metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o7777);
            write_atomic(path, out.as_bytes(), mode)?;
            Ok(Registration::Added)
        }
    }
}

/// What `register_device` would do, without writing: an error if it would fail.
pub fn check_registration(
    path: &Path,
    tenant: &str,
    device: &str,
    profile: &str,
    site: Option<&str>,
) -> Result<Registration, PkiError> {
    Ok(match plan(path, tenant, device, profile, site)? {
        None => Registration::AlreadyThere,
        Some(_) => Registration::Added,
    })
}

/// The registry's new text, or `None` if it has the device already.
fn plan(
    path: &Path,
    tenant: &str,
    device: &str,
    profile: &str,
    site: Option<&str>,
) -> Result<Option<String>, PkiError> {
    check_name("tenant", tenant)?;
    check_name("device", device)?;
    let err = |message: String| PkiError::Registry {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let current = Registry::parse(&text, path).map_err(|e| err(e.to_string()))?;
    if current.device(tenant, device).is_some() {
        return Ok(None);
    }
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| err(e.to_string()))?;
    let devices = doc
        .entry("devices")
        .or_insert(Item::ArrayOfTables(ArrayOfTables::new()));
    let Some(devices) = devices.as_array_of_tables_mut() else {
        return Err(err("`devices` is not an array of tables".into()));
    };
    let mut t = Table::new();
    t.insert("tenant", value(tenant));
    t.insert("id", value(device));
    t.insert("profile", value(profile));
    if let Some(site) = site {
        t.insert("site", value(site));
    }
    devices.push(t);
    let out = doc.to_string();
    let updated = Registry::parse(&out, path).map_err(|e| err(e.to_string()))?;
    if updated.device(tenant, device).is_none() {
        return Err(err(format!("{tenant}/{device} not found after adding it")));
    }
    Ok(Some(out))
}

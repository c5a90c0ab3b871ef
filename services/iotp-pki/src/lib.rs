//! The project CA: one directory holding the CA certificate and key, an index of what it
//! issued, the certificates themselves and the CRL Mosquitto reads.
//!
//! - A device certificate's CN is `{tenant}/{deviceId}`: with `use_identity_as_username`
//!   Mosquitto takes it as the username, and the ACL (`dev/mosquitto.acl`) lets that username
//!   publish only to `iot/{tenant}/{deviceId}/+` and subscribe only to `cmd/{tenant}/{deviceId}`.
//! - The bridge's certificate names the bridge (`iotp-bridge`, no `/`, so no device can
//!   share its username); the broker's certificate carries its host names as SANs.
//! - Keys are P-256 ECDSA, written with mode 0600. Serial numbers are random (16 bytes).
//! - Revoking (or rotating, which revokes the old certificate as superseded) rewrites the CRL;
//!   Mosquitto reads it again only on SIGHUP.
//!
//! Layout of a CA directory:
//!
//! ```text
//! ca.pem ca.key            the CA (key 0600)
//! index.toml               every certificate issued: serial, kind, subject, validity, revocation
//! crl.pem                  the CRL (rewritten by revoke, rotate and `crl`)
//! issued/{serial}.pem      a copy of each certificate issued
//! devices/{tenant}/{device}.pem|.key   the device's current certificate and key
//! bridge/{name}.pem|.key   the bridge's
//! broker/{name}.pem|.key   the broker's
//! ```

mod registry;

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

pub use registry::{check_registration, register_device, Registration};

/// The CA certificate's file name in a CA directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA key's file name.
pub const CA_KEY: &str = "ca.key";
/// The index of issued certificates.
pub const INDEX: &str = "index.toml";
/// The CRL's file name.
pub const CRL: &str = "crl.pem";
/// The bridge identity's default name (the ACL's `user iotp-bridge`).
pub const BRIDGE_NAME: &str = "iotp-bridge";

/// What went wrong; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// No CA in the directory.
    #[error("no CA in {0}: run `iotp-pki init --dir {0}` first")]
    NoCa(PathBuf),
    /// `init` on a directory that already holds a CA.
    #[error("{0} already holds a CA (ca.pem); refusing to overwrite it")]
    CaExists(PathBuf),
    /// A tenant, device or name unfit for a certificate subject and a topic level.
    #[error("invalid {what} {value:?}: use 1-64 of A-Z a-z 0-9 . _ - (no '/', '+', '#')")]
    BadName {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: String,
    },
    /// No certificate known for that device.
    #[error("unknown device {0}: the CA never issued it a certificate (see `iotp-pki list`)")]
    UnknownDevice(String),
    /// No certificate with that serial.
    #[error("unknown serial {0} (see `iotp-pki list`)")]
    UnknownSerial(String),
    /// Nothing valid left to revoke or rotate.
    #[error("{0} has no valid certificate (all revoked)")]
    NothingValid(String),
    /// `issue` for a device that has a valid certificate.
    #[error("device {name} already has a valid certificate (serial {serial}): use `rotate` for a new one")]
    AlreadyIssued {
        /// `tenant/device`.
        name: String,
        /// The valid certificate's serial.
        serial: String,
    },
    /// Already revoked.
    #[error("certificate {0} is already revoked")]
    AlreadyRevoked(String),
    /// Bad validity.
    #[error("invalid validity: {0}")]
    BadValidity(String),
    /// `issue-broker` without hosts, or a host unfit for a SAN.
    #[error("invalid broker host {0:?}")]
    BadHost(String),
    /// The index does not parse.
    #[error("corrupt index {path}: {message}")]
    Index {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The device registry could not be updated.
    #[error("registry {path}: {message}")]
    Registry {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Certificate generation.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A file.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, PkiError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A device's client certificate, CN `tenant/device`.
    Device,
    /// The bridge's client certificate.
    Bridge,
    /// The broker's server certificate.
    Broker,
}

/// One issued certificate, as the index keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// What it is for.
    pub kind: Kind,
    /// Subject CN: `tenant/device`, the bridge's name or the broker's first host.
    pub subject: String,
    /// Tenant (devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Device id (devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// SANs (broker).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Valid from, RFC 3339.
    pub not_before: String,
    /// Valid until, RFC 3339.
    pub not_after: String,
    /// When it was revoked, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    /// Why: `superseded` (rotated) or `unspecified`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation_reason: Option<String>,
}

impl Entry {
    /// What is known before signing: serial and validity are filled in by the issue.
    fn to_issue(kind: Kind, subject: String) -> Self {
        Self {
            serial: String::new(),
            kind,
            subject,
            tenant: None,
            device: None,
            hosts: Vec::new(),
            not_before: String::new(),
            not_after: String::new(),
            revoked_at: None,
            revocation_reason: None,
        }
    }

    /// Whether it has been revoked.
    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }

    /// Whether it is past its `not_after`.
    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        OffsetDateTime::parse(&self.not_after, &Rfc3339).is_ok_and(|t| t < now)
    }

    /// `valid`, `revoked` or `expired` at `now`.
    pub fn status(&self, now: OffsetDateTime) -> &'static str {
        if self.is_revoked() {
            "revoked"
        } else if self.is_expired(now) {
            "expired"
        } else {
            "valid"
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Index {
    /// The last CRL number written.
    #[serde(default)]
    crl_number: u64,
    #[serde(default)]
    certs: Vec<Entry>,
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// From.
    pub not_before: OffsetDateTime,
    /// Until.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clock skew) for `days` days.
    pub fn days(days: u32) -> Result<Self> {
        if days == 0 {
            return Err(PkiError::BadValidity("days must be at least 1".into()));
        }
        let now = OffsetDateTime::now_utc();
        Ok(Self {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(i64::from(days)),
        })
    }

    fn check(&self) -> Result<()> {
        if self.not_after <= self.not_before {
            return Err(PkiError::BadValidity(
                "not_after must be after not_before".into(),
            ));
        }
        Ok(())
    }
}

/// A certificate just issued and where its files are.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Its index entry.
    pub entry: Entry,
    /// The certificate, PEM.
    pub cert_file: PathBuf,
    /// Its private key, PEM (PKCS#8), mode 0600.
    pub key_file: PathBuf,
}

/// What to revoke.
#[derive(Debug, Clone)]
pub enum Target {
    /// Every valid certificate of the device `tenant/device`.
    Device {
        /// Tenant.
        tenant: String,
        /// Device id.
        device: String,
    },
    /// One certificate (hex serial, any case, leading zeros optional).
    Serial(String),
}

/// A project CA opened from its directory.
pub struct Ca {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    index: Index,
    /// Within [`Ca::ensure_devices`]: the index is written once at the end.
    defer_index: bool,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Ca").field("dir", &self.dir).finish()
    }
}

/// Check a tenant, device id or name: one topic level, a safe file name.
pub fn check_name(what: &'static str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value != "."
        && value != ".."
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadName {
            what,
            value: value.into(),
        })
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    // Formatting a UTC date-time as RFC 3339 cannot fail for years 0-9999.
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn parse_serial(hex: &str) -> Option<Vec<u8>> {
    let hex = hex.trim().trim_start_matches("0x").to_ascii_lowercase();
    if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let hex = if hex.len() % 2 == 1 {
        format!("0{hex}")
    } else {
        hex
    };
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

fn serial_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn normalise_serial(hex: &str) -> Option<String> {
    let bytes = parse_serial(hex)?;
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    Some(serial_hex(&bytes[first..]))
}

/// Write `contents` to `path` through a temporary file and a rename; `mode` for new files.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(contents).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

impl Ca {
    /// Create a CA in `dir` (created if missing): a P-256 key, a self-signed CA certificate
    /// named `common_name`, valid `days` days, an empty index and an empty CRL.
    pub fn init(dir: &Path, common_name: &str, days: u32) -> Result<Self> {
        if dir.join(CA_CERT).exists() || dir.join(CA_KEY).exists() {
            return Err(PkiError::CaExists(dir.to_path_buf()));
        }
        let validity = Validity::days(days)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "iotp");
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.serial_number = Some(random_serial());
        params.key_identifier_method = KeyIdMethod::Sha256;
        let cert = params.self_signed(&key)?;
        write_atomic(&dir.join(CA_KEY), key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(&dir.join(CA_CERT), cert.pem().as_bytes(), 0o644)?;
        let mut ca = Self {
            dir: dir.to_path_buf(),
            issuer: Issuer::new(params, key),
            index: Index::default(),
            defer_index: false,
        };
        ca.save_index()?;
        ca.write_crl(None, 30)?;
        Ok(ca)
    }

    /// Open the CA in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        if !cert_path.exists() || !key_path.exists() {
            return Err(PkiError::NoCa(dir.to_path_buf()));
        }
        let cert = fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key = fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let key = KeyPair::from_pem(&key)?;
        let issuer = Issuer::from_ca_cert_pem(&cert, key)?;
        let index_path = dir.join(INDEX);
        let index = match fs::read_to_string(&index_path) {
            Ok(text) => toml::from_str(&text).map_err(|e| PkiError::Index {
                path: index_path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Index::default(),
            Err(e) => return Err(io(&index_path)(e)),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            issuer,
            index,
            defer_index: false,
        })
    }

    /// The CA directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate's path.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }

    /// The CRL's path.
    pub fn crl_file(&self) -> PathBuf {
        self.dir.join(CRL)
    }

    /// Every certificate issued, oldest first.
    pub fn list(&self) -> &[Entry] {
        &self.index.certs
    }

    /// Where a device's current certificate and key are.
    pub fn device_files(&self, tenant: &str, device: &str) -> (PathBuf, PathBuf) {
        let base = self.dir.join("devices").join(tenant);
        (
            base.join(format!("{device}.pem")),
            base.join(format!("{device}.key")),
        )
    }

    /// Issue a device certificate (CN `tenant/device`, client authentication) valid for
    /// `validity`. Refused if the device holds a valid (unrevoked, unexpired) one: rotate it.
    pub fn issue_device(
        &mut self,
        tenant: &str,
        device: &str,
        validity: Validity,
    ) -> Result<Issued> {
        check_name("tenant", tenant)?;
        check_name("device", device)?;
        let name = format!("{tenant}/{device}");
        let now = OffsetDateTime::now_utc();
        if let Some(valid) = self
            .device_certs(tenant, device)
            .find(|e| !e.is_revoked() && !e.is_expired(now))
        {
            return Err(PkiError::AlreadyIssued {
                name,
                serial: valid.serial.clone(),
            });
        }
        self.issue_device_unchecked(tenant, device, validity)
    }

    /// [`Ca::ensure_device`] for many devices of `tenant`, writing the index once (a fleet of
    /// thousands would otherwise rewrite it thousands of times); files in `devices`' order.
    pub fn ensure_devices<'a>(
        &mut self,
        tenant: &str,
        devices: impl IntoIterator<Item = &'a str>,
        validity: Validity,
    ) -> Result<Vec<(PathBuf, PathBuf)>> {
        self.defer_index = true;
        let files: Result<Vec<_>> = devices
            .into_iter()
            .map(|d| self.ensure_device(tenant, d, validity))
            .collect();
        self.defer_index = false;
        self.save_index()?;
        files
    }

    /// The device's certificate and key files: its current ones if it holds a valid
    /// certificate and they are on disk, else a new certificate (the simulator's fleets).
    pub fn ensure_device(
        &mut self,
        tenant: &str,
        device: &str,
        validity: Validity,
    ) -> Result<(PathBuf, PathBuf)> {
        check_name("tenant", tenant)?;
        check_name("device", device)?;
        let (cert, key) = self.device_files(tenant, device);
        let now = OffsetDateTime::now_utc();
        let valid = self
            .device_certs(tenant, device)
            .any(|e| !e.is_revoked() && !e.is_expired(now));
        if valid && cert.exists() && key.exists() {
            return Ok((cert, key));
        }
        let issued = if valid {
            self.rotate(tenant, device, validity)?
        } else {
            self.issue_device_unchecked(tenant, device, validity)?
        };
        Ok((issued.cert_file, issued.key_file))
    }

    fn issue_device_unchecked(
        &mut self,
        tenant: &str,
        device: &str,
        validity: Validity,
    ) -> Result<Issued> {
        let (cert_file, key_file) = self.device_files(tenant, device);
        let entry = Entry {
            tenant: Some(tenant.into()),
            device: Some(device.into()),
            ..Entry::to_issue(Kind::Device, format!("{tenant}/{device}"))
        };
        self.issue(entry, validity, cert_file, key_file)
    }

    /// Issue the bridge's client certificate, CN `name` (the ACL's bridge user). A name with
    /// a '/' is refused: it could collide with a device's `tenant/device` username.
    pub fn issue_bridge(&mut self, name: &str, validity: Validity) -> Result<Issued> {
        check_name("bridge name", name)?;
        let base = self.dir.join("bridge");
        let entry = Entry::to_issue(Kind::Bridge, name.into());
        self.issue(
            entry,
            validity,
            base.join(format!("{name}.pem")),
            base.join(format!("{name}.key")),
        )
    }

    /// Issue the broker's server certificate: CN the first host, every host a SAN (DNS name
    /// or IP address), written as `broker/{name}.pem|.key`.
    pub fn issue_broker(
        &mut self,
        name: &str,
        hosts: &[String],
        validity: Validity,
    ) -> Result<Issued> {
        check_name("broker name", name)?;
        let Some(first) = hosts.first() else {
            return Err(PkiError::BadHost(String::new()));
        };
        for h in hosts {
            if h.is_empty() || h.contains(['/', ' ', '+', '#']) {
                return Err(PkiError::BadHost(h.clone()));
            }
        }
        let base = self.dir.join("broker");
        let entry = Entry {
            hosts: hosts.to_vec(),
            ..Entry::to_issue(Kind::Broker, first.clone())
        };
        self.issue(
            entry,
            validity,
            base.join(format!("{name}.pem")),
            base.join(format!("{name}.key")),
        )
    }

    /// The serials of a known device's unrevoked certificates; an error if the device has no
    /// certificate at all, or none still valid.
    fn valid_serials(&self, tenant: &str, device: &str) -> Result<Vec<String>> {
        check_name("tenant", tenant)?;
        check_name("device", device)?;
        let name = format!("{tenant}/{device}");
        if self.device_certs(tenant, device).next().is_none() {
            return Err(PkiError::UnknownDevice(name));
        }
        let valid: Vec<String> = self
            .device_certs(tenant, device)
            .filter(|e| !e.is_revoked())
            .map(|e| e.serial.clone())
            .collect();
        if valid.is_empty() {
            return Err(PkiError::NothingValid(name));
        }
        Ok(valid)
    }

    /// A new certificate and key for a device that has one; the old valid ones are revoked
    /// (reason superseded) and the CRL rewritten.
    pub fn rotate(&mut self, tenant: &str, device: &str, validity: Validity) -> Result<Issued> {
        let old = self.valid_serials(tenant, device)?;
        let issued = self.issue_device_unchecked(tenant, device, validity)?;
        self.mark_revoked(&old, RevocationReason::Superseded);
        self.save_index()?;
        self.write_crl(None, 30)?;
        Ok(issued)
    }

    /// Revoke, write the index and the CRL; returns what was revoked. Mosquitto applies the
    /// new CRL after a SIGHUP.
    pub fn revoke(&mut self, target: &Target) -> Result<Vec<Entry>> {
        let serials: Vec<String> = match target {
            Target::Device { tenant, device } => self.valid_serials(tenant, device)?,
            Target::Serial(hex) => {
                let wanted =
                    normalise_serial(hex).ok_or_else(|| PkiError::UnknownSerial(hex.clone()))?;
                let entry = self
                    .index
                    .certs
                    .iter()
                    .find(|e| normalise_serial(&e.serial).as_deref() == Some(wanted.as_str()))
                    .ok_or_else(|| PkiError::UnknownSerial(hex.clone()))?;
                if entry.is_revoked() {
                    return Err(PkiError::AlreadyRevoked(entry.serial.clone()));
                }
                vec![entry.serial.clone()]
            }
        };
        self.mark_revoked(&serials, RevocationReason::Unspecified);
        self.save_index()?;
        self.write_crl(None, 30)?;
        Ok(self
            .index
            .certs
            .iter()
            .filter(|e| serials.contains(&e.serial))
            .cloned()
            .collect())
    }

    /// Write the CRL (every revoked certificate, signed by the CA, valid `days` days: write
    /// it again before then, or Mosquitto refuses every client) to `out` or `crl.pem`.
    pub fn write_crl(&mut self, out: Option<&Path>, days: u32) -> Result<PathBuf> {
        if days == 0 {
            return Err(PkiError::BadValidity("CRL days must be at least 1".into()));
        }
        let now = OffsetDateTime::now_utc();
        self.index.crl_number += 1;
        let revoked_certs = self
            .index
            .certs
            .iter()
            .filter_map(|e| {
                let at = OffsetDateTime::parse(e.revoked_at.as_deref()?, &Rfc3339).ok()?;
                let serial = parse_serial(&e.serial)?;
                Some(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial),
                    revocation_time: at,
                    reason_code: Some(match e.revocation_reason.as_deref() {
                        Some("superseded") => RevocationReason::Superseded,
                        _ => RevocationReason::Unspecified,
                    }),
                    invalidity_date: None,
                })
            })
            .collect();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(i64::from(days)),
            crl_number: SerialNumber::from_slice(&minimal_be(self.index.crl_number)),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer)?;
        let path = out.map_or_else(|| self.crl_file(), Path::to_path_buf);
        write_atomic(&path, crl.pem()?.as_bytes(), 0o644)?;
        self.save_index()?;
        Ok(path)
    }

    fn device_certs<'a>(
        &'a self,
        tenant: &'a str,
        device: &'a str,
    ) -> impl Iterator<Item = &'a Entry> + 'a {
        self.index.certs.iter().filter(move |e| {
            e.kind == Kind::Device
                && e.tenant.as_deref() == Some(tenant)
                && e.device.as_deref() == Some(device)
        })
    }

    fn mark_revoked(&mut self, serials: &[String], reason: RevocationReason) {
        let at = rfc3339(OffsetDateTime::now_utc());
        let reason = match reason {
            RevocationReason::Superseded => "superseded",
            _ => "unspecified",
        };
        for e in &mut self.index.certs {
            if serials.contains(&e.serial) && e.revoked_at.is_none() {
                e.revoked_at = Some(at.clone());
                e.revocation_reason = Some(reason.into());
            }
        }
    }

    fn issue(
        &mut self,
        mut entry: Entry,
        validity: Validity,
        cert_file: PathBuf,
        key_file: PathBuf,
    ) -> Result<Issued> {
        validity.check()?;
        let key = KeyPair::generate()?;
        let serial = random_serial();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "iotp");
        if let Some(tenant) = &entry.tenant {
            dn.push(DnType::OrganizationalUnitName, tenant.as_str());
        }
        dn.push(DnType::CommonName, entry.subject.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.serial_number = Some(serial.clone());
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        match entry.kind {
            Kind::Device | Kind::Bridge => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            Kind::Broker => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                params.subject_alt_names = entry
                    .hosts
                    .iter()
                    .map(|h| match h.parse::<std::net::IpAddr>() {
                        Ok(ip) => Ok(SanType::IpAddress(ip)),
                        Err(_) => h
                            .clone()
                            .try_into()
                            .map(SanType::DnsName)
                            .map_err(|_| PkiError::BadHost(h.clone())),
                    })
                    .collect::<Result<_>>()?;
            }
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        entry.serial = serial_hex(serial.as_ref());
        entry.not_before = rfc3339(validity.not_before);
        entry.not_after = rfc3339(validity.not_after);
        let pem = cert.pem();
        write_atomic(&key_file, key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(&cert_file, pem.as_bytes(), 0o644)?;
        write_atomic(
            &self
                .dir
                .join("issued")
                .join(format!("{}.pem", entry.serial)),
            pem.as_bytes(),
            0o644,
        )?;
        self.index.certs.push(entry.clone());
        if !self.defer_index {
            self.save_index()?;
        }
        Ok(Issued {
            entry,
            cert_file,
            key_file,
        })
    }

    fn save_index(&self) -> Result<()> {
        let path = self.dir.join(INDEX);
        let text = toml::to_string_pretty(&self.index).map_err(|e| PkiError::Index {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let text = format!("# Certificates issued by this CA (iotp-pki); do not edit.\n{text}");
        write_atomic(&path, text.as_bytes(), 0o644)
    }
}

/// `n` as a minimal big-endian unsigned integer (DER wants no leading zero bytes; a leading
/// zero is added back where the top bit is set).
fn minimal_be(n: u64) -> Vec<u8> {
    let bytes = n.to_be_bytes();
    let first = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len() - 1);
    let mut out = bytes[first..].to_vec();
    if out[0] & 0x80 != 0 {
        out.insert(0, 0);
    }
    out
}

/// 16 random bytes, positive (top bit clear) and never starting with a zero byte, so the hex
/// form in the index is the DER integer's.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests;

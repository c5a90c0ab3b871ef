#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ::time::{Duration, OffsetDateTime};
use x509_parser::pem::parse_x509_pem;
use x509_parser::prelude::{CertificateRevocationList, FromDer, GeneralName, X509Certificate};

use super::*;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("iotp-pki-unit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn cn_of(der: &[u8]) -> String {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    cn
}

fn pem_der(path: &Path) -> Vec<u8> {
    let text = std::fs::read(path).unwrap();
    let (_, pem) = parse_x509_pem(&text).unwrap();
    pem.contents
}

/// The certificate at `cert` is signed by the CA in `dir`.
fn signed_by_ca(cert: &Path, dir: &Path) -> bool {
    let ca_der = pem_der(&dir.join(CA_CERT));
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    let der = pem_der(cert);
    let (_, leaf) = X509Certificate::from_der(&der).unwrap();
    leaf.verify_signature(Some(ca.public_key())).is_ok() && leaf.issuer() == ca.subject()
}

/// Serials on the CRL at `path`, lowercase hex, after checking it is signed by the CA.
fn crl_serials(path: &Path, dir: &Path) -> Vec<String> {
    let der = pem_der(path);
    let (_, crl) = CertificateRevocationList::from_der(&der).unwrap();
    let ca_der = pem_der(&dir.join(CA_CERT));
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    assert_eq!(crl.issuer(), ca.subject());
    assert!(
        crl.verify_signature(ca.public_key()).is_ok(),
        "CRL signed by the CA"
    );
    crl.iter_revoked_certificates()
        .map(|r| serial_hex(r.raw_serial()))
        .collect()
}

fn year() -> Validity {
    Validity::days(365).unwrap()
}

#[test]
fn init_writes_the_ca_with_a_private_key_and_an_empty_crl_and_never_overwrites_it() {
    let dir = scratch("init");
    let ca = Ca::init(&dir, "test CA", 30).unwrap();
    assert_eq!(mode(&dir.join(CA_KEY)), 0o600);
    assert!(dir.join(INDEX).exists());
    assert!(ca.list().is_empty());
    assert!(crl_serials(&dir.join(CRL), &dir).is_empty());
    let der = pem_der(&dir.join(CA_CERT));
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert!(cert.is_ca());
    assert_eq!(cn_of(&der), "test CA");
    assert!(matches!(
        Ca::init(&dir, "again", 30),
        Err(PkiError::CaExists(_))
    ));
    assert!(
        format!("{ca:?}").contains("dir"),
        "Debug names the directory only"
    );
}

#[test]
fn a_missing_ca_is_a_clear_error() {
    let dir = scratch("missing");
    let err = Ca::open(&dir).unwrap_err();
    assert!(matches!(err, PkiError::NoCa(_)));
    assert!(err.to_string().contains("iotp-pki init"), "{err}");
}

#[test]
fn a_device_certificate_names_tenant_and_device_and_is_signed_by_the_ca() {
    let dir = scratch("issue");
    Ca::init(&dir, "ca", 30).unwrap();
    let mut ca = Ca::open(&dir).unwrap();
    let issued = ca.issue_device("acme", "meter-1", year()).unwrap();
    assert_eq!(issued.entry.subject, "acme/meter-1");
    assert_eq!(cn_of(&pem_der(&issued.cert_file)), "acme/meter-1");
    assert_eq!(mode(&issued.key_file), 0o600);
    assert!(signed_by_ca(&issued.cert_file, &dir));
    let der = pem_der(&issued.cert_file);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert!(!cert.is_ca());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    assert_eq!(serial_hex(cert.raw_serial()), issued.entry.serial);
    // P-256 ECDSA.
    assert_eq!(
        cert.public_key()
            .algorithm
            .parameters
            .as_ref()
            .unwrap()
            .as_oid()
            .unwrap(),
        x509_parser::oid_registry::OID_EC_P256
    );
    // The index survives a reopen.
    let ca = Ca::open(&dir).unwrap();
    assert_eq!(ca.list().len(), 1);
    assert_eq!(ca.list()[0].status(OffsetDateTime::now_utc()), "valid");
}

#[test]
fn a_device_with_a_valid_certificate_is_rotated_not_issued_again() {
    let dir = scratch("twice");
    let mut ca = Ca::init(&dir, "ca", 30).unwrap();
    let first = ca.issue_device("acme", "m", year()).unwrap();
    match ca.issue_device("acme", "m", year()) {
        Err(PkiError::AlreadyIssued { name, serial }) => {
            assert_eq!(name, "acme/m");
            assert_eq!(serial, first.entry.serial);
        }
        other => panic!("{other:?}"),
    }
    // Another device of the same tenant is fine.
    ca.issue_device("acme", "n", year()).unwrap();
}

#[test]
fn names_that_are_not_one_topic_level_are_refused() {
    let dir = scratch("names");
    let mut ca = Ca::init(&dir, "ca", 30).unwrap();
    for (tenant, device) in [
        ("", "d"),
        ("a/b", "d"),
        ("t", "d/e"),
        ("t", "+"),
        ("t", "#"),
        ("t", ".."),
        ("t", "sp ace"),
    ] {
        let err = ca.issue_device(tenant, device, year()).unwrap_err();
        assert!(
            matches!(err, PkiError::BadName { .. }),
            "{tenant}/{device}: {err}"
        );
    }
    assert!(matches!(
        ca.issue_bridge("iotp/bridge", year()),
        Err(PkiError::BadName { .. })
    ));
    assert!(ca.list().is_empty());
}

#[test]
fn a_validity_that_ends_before_it_starts_is_refused() {
    let dir = scratch("validity");
    let mut ca = Ca::init(&dir, "ca", 30).unwrap();
    let now = OffsetDateTime::now_utc();
    let bad = Validity {
        not_before: now,
        not_after: now - Duration::days(1),
    };
    assert!(matches!(
        ca.issue_device("t", "d", bad),
        Err(PkiError::BadValidity(_))
    ));
    assert!(matches!(Validity::days(0), Err(PkiError::BadValidity(_))));
}

#[test]
fn an_expired_certificate_is_listed_as_expired_and_a_new_one_may_be_issued() {
    let dir = scratch("expired");
    let mut ca = Ca::init(&dir, "ca", 30).unwrap();
    let now = OffsetDateTime::now_utc();
    let past = Validity {
        not_before: now - Duration::days(2),
        not_after: now - Duration::days(1),
    };
    let old = ca.issue_device("t", "d", past).unwrap();
    assert_eq!(old.entry.status(now), "expired");
    let new = ca.issue_device("t", "d", year()).unwrap();
    assert_eq!(new.entry.status(now), "valid");
}

#[test]
fn the_bridge_certificate_is_a_client_identity_without_a_slash() {
    let dir = scratch("bridge");
    let mut ca = Ca::init(&dir, "ca", 30).unwrap();
    let issued = ca.issue_bridge(BRIDGE_NAME, year()).unwrap();
    assert_eq!(cn_of(&pem_der(&issued.cert_file)), "iotp-bridge");
    assert!(signed_by_ca(&issued.cert_file, &dir));
    assert_eq!(issued.entry.kind, Kind::Bridge);
    assert_eq!(mode(&issued.key_file), 0o600);
}

#[test]
fn the_broker_certificate_carries_its_hosts_as_sans() {
    let dir = scratch("broker");
    let mut ca = Ca::init(&dir, "ca", 30).unwrap();
    let hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let issued = ca.issue_broker("mosquitto", &hosts, year()).unwrap();
    let der = pem_der(&issued.cert_file);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::DNSName(d) => d.to_string(),
            GeneralName::IPAddress(ip) => format!("{ip:?}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(sans, ["localhost", "[127, 0, 0, 1]"]);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth);
    assert!(matches!(
        ca.issue_broker("mosquitto", &[], year()),
        Err(PkiError::BadHost(_))
    ));
}

#[test]
fn rotation_issues_a_new_certificate_and_revokes_the_old_one_on_the_crl() {
    let dir = scratch("rotate");
    let mut ca = Ca::init(&dir, "ca", 30).unwrap();
    let old = ca.issue_device("acme", "m", year()).unwrap();
    let old_pem = std::fs::read(&old.cert_file).unwrap();
    let new = ca.rotate("acme", "m", year()).unwrap();
    assert_ne!(new.entry.serial, old.entry.serial);
    assert_eq!(
        new.cert_file, old.cert_file,
        "the device's files are replaced"
    );
    assert_ne!(std::fs::read(&new.cert_file).unwrap(), old_pem);
    let now = OffsetDateTime::now_utc();
    let statuses: Vec<_> = ca.list().iter().map(|e| e.status(now)).collect();
    assert_eq!(statuses, ["revoked", "valid"]);
    assert_eq!(
        ca.list()[0].revocation_reason.as_deref(),
        Some("superseded")
    );
    assert_eq!(
        crl_serials(&dir.join(CRL), &dir),
        std::slice::from_ref(&old.entry.serial)
    );
    assert!(matches!(
        ca.rotate("acme", "nope", year()),
        Err(PkiError::UnknownDevice(d)) if d == "acme/nope"
    ));
}

#[test]
fn revocation_by_device_and_by_serial_lands_on_the_crl() {
    let dir = scratch("revoke");
    let mut ca = Ca::init(&dir, "ca", 30).unwrap();
    let a = ca.issue_device("t", "a", year()).unwrap();
    let b = ca.issue_device("t", "b", year()).unwrap();
    let c = ca.issue_device("u", "c", year()).unwrap();
    let revoked = ca
        .revoke(&Target::Device {
            tenant: "t".into(),
            device: "a".into(),
        })
        .unwrap();
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0].serial, a.entry.serial);
    // By serial, in upper case: found all the same.
    ca.revoke(&Target::Serial(b.entry.serial.to_uppercase()))
        .unwrap();
    let mut on_crl = crl_serials(&dir.join(CRL), &dir);
    on_crl.sort();
    let mut want = vec![a.entry.serial.clone(), b.entry.serial.clone()];
    want.sort();
    assert_eq!(on_crl, want);
    assert!(!on_crl.contains(&c.entry.serial));
    // Errors.
    assert!(matches!(
        ca.revoke(&Target::Serial(b.entry.serial.clone())),
        Err(PkiError::AlreadyRevoked(_))
    ));
    assert!(matches!(
        ca.revoke(&Target::Serial("abcdef".into())),
        Err(PkiError::UnknownSerial(_))
    ));
    assert!(matches!(
        ca.revoke(&Target::Serial("not hex".into())),
        Err(PkiError::UnknownSerial(_))
    ));
    assert!(matches!(
        ca.revoke(&Target::Device {
            tenant: "t".into(),
            device: "zz".into()
        }),
        Err(PkiError::UnknownDevice(_))
    ));
    assert!(matches!(
        ca.revoke(&Target::Device {
            tenant: "t".into(),
            device: "a".into()
        }),
        Err(PkiError::NothingValid(_))
    ));
    // Survives a reopen.
    let ca = Ca::open(&dir).unwrap();
    assert_eq!(ca.list().iter().filter(|e| e.is_revoked()).count(), 2);
}

#[test]
fn the_crl_is_written_where_asked_with_a_rising_number() {
    let dir = scratch("crl");
    let mut ca = Ca::init(&dir, "ca", 30).unwrap();
    let out = dir.join("elsewhere/crl.pem");
    let first = ca.write_crl(Some(&out), 7).unwrap();
    assert_eq!(first, out);
    let number = |p: &Path| {
        let der = pem_der(p);
        let (_, crl) = CertificateRevocationList::from_der(&der).unwrap();
        let next = crl.next_update().unwrap().to_datetime();
        (crl.crl_number().unwrap().clone(), next)
    };
    let (n1, next1) = number(&out);
    let (n2, _) = {
        ca.write_crl(None, 30).unwrap();
        number(&dir.join(CRL))
    };
    assert!(n2 > n1);
    let days = (next1 - OffsetDateTime::now_utc()).whole_days();
    assert!((6..=7).contains(&days), "{days}");
    assert!(matches!(
        ca.write_crl(None, 0),
        Err(PkiError::BadValidity(_))
    ));
}

#[test]
fn serials_parse_in_any_case_with_or_without_leading_zeros() {
    assert_eq!(normalise_serial("00AbC"), Some("0abc".into()));
    assert_eq!(normalise_serial("0abc"), Some("0abc".into()));
    assert_eq!(normalise_serial("xyz"), None);
    assert_eq!(minimal_be(1), [1]);
    assert_eq!(minimal_be(0x80), [0, 0x80]);
    assert_eq!(minimal_be(0x1234), [0x12, 0x34]);
}

const REGISTRY: &str = "# comment kept\n[profiles.p]\nmetrics = { t = { unit = \"Cel\", min = -1.0, max = 1.0 } }\n\n[[devices]]\ntenant = \"acme\"\nid = \"old\"\nprofile = \"p\"\n";

#[test]
fn registering_a_device_adds_it_once_and_keeps_the_file() {
    let dir = scratch("registry");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("registry.toml");
    std::fs::write(&path, REGISTRY).unwrap();
    assert_eq!(
        check_registration(&path, "acme", "new", "p", Some("s1")).unwrap(),
        Registration::Added
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        REGISTRY,
        "a check writes nothing"
    );
    assert_eq!(
        register_device(&path, "acme", "new", "p", Some("s1")).unwrap(),
        Registration::Added
    );
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("# comment kept"));
    let reg = iotp_contract::devices::Registry::parse(&text, &path).unwrap();
    let (dev, _) = reg.device("acme", "new").unwrap();
    assert_eq!(dev.site.as_deref(), Some("s1"));
    assert!(reg.device("acme", "old").is_some());
    assert_eq!(
        register_device(&path, "acme", "new", "p", None).unwrap(),
        Registration::AlreadyThere
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
}

#[test]
fn registering_with_an_unknown_profile_leaves_the_registry_alone() {
    let dir = scratch("registry-bad");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("registry.toml");
    std::fs::write(&path, REGISTRY).unwrap();
    let err = register_device(&path, "acme", "x", "nope", None).unwrap_err();
    assert!(err.to_string().contains("unknown profile nope"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), REGISTRY);
    let missing = dir.join("none.toml");
    assert!(matches!(
        register_device(&missing, "acme", "x", "p", None),
        Err(PkiError::Registry { .. })
    ));
}

#[test]
fn ensure_device_reuses_a_valid_certificate_and_issues_otherwise() {
    let dir = scratch("ensure");
    let mut ca = Ca::init(&dir, "ca", 30).unwrap();
    let (cert, key) = ca.ensure_device("t", "d", year()).unwrap();
    let first = std::fs::read(&cert).unwrap();
    assert_eq!(
        ca.ensure_device("t", "d", year()).unwrap(),
        (cert.clone(), key.clone())
    );
    assert_eq!(std::fs::read(&cert).unwrap(), first);
    assert_eq!(ca.list().len(), 1);
    // Files gone: a new certificate, the old one revoked.
    std::fs::remove_file(&key).unwrap();
    ca.ensure_device("t", "d", year()).unwrap();
    let now = OffsetDateTime::now_utc();
    let statuses: Vec<_> = ca.list().iter().map(|e| e.status(now)).collect();
    assert_eq!(statuses, ["revoked", "valid"]);
}

#[test]
fn ensure_devices_issues_a_fleet_and_writes_the_index_once_at_the_end() {
    let dir = scratch("fleet");
    let mut ca = Ca::init(&dir, "ca", 30).unwrap();
    ca.issue_device("t", "d1", year()).unwrap();
    let files = ca.ensure_devices("t", ["d0", "d1", "d2"], year()).unwrap();
    assert_eq!(files.len(), 3);
    assert_eq!(
        files[1],
        ca.device_files("t", "d1"),
        "d1 kept its certificate"
    );
    let reopened = Ca::open(&dir).unwrap();
    assert_eq!(reopened.list().len(), 3);
    let err = ca
        .ensure_devices("t", ["ok", "bad/name"], year())
        .unwrap_err();
    assert!(matches!(err, PkiError::BadName { .. }));
    // What was issued before the error is in the index.
    assert_eq!(Ca::open(&dir).unwrap().list().len(), 4);
}

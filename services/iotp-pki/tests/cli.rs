//! The `iotp-pki` binary: each command once, and its errors for bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("iotp-pki-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Run `iotp-pki --dir dir args`: success, stdout, stderr.
fn pki(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_iotp-pki"))
        .arg("--dir")
        .arg(dir)
        .args(args)
        .env_remove("IOTP_PKI_DIR")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_command_once() {
    let root = scratch("all");
    let ca = root.join("pki");
    let (ok, out, err) = pki(&ca, &["init"]);
    assert!(ok, "{err}");
    assert!(out.contains("CA created"), "{out}");
    let mode = std::fs::metadata(ca.join("ca.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    let registry = root.join("registry.toml");
    std::fs::write(
        &registry,
        "[profiles.p]\nmetrics = { t = { unit = \"Cel\", min = -1.0, max = 1.0 } }\n",
    )
    .unwrap();
    let reg = registry.to_str().unwrap();
    let (ok, out, err) = pki(
        &ca,
        &[
            "issue",
            "--tenant",
            "acme",
            "--device",
            "m1",
            "--registry",
            reg,
            "--profile",
            "p",
            "--site",
            "s",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("issued device acme/m1"), "{out}");
    assert!(out.contains("registered acme/m1"), "{out}");
    assert!(std::fs::read_to_string(&registry)
        .unwrap()
        .contains("id = \"m1\""));
    assert!(ca.join("devices/acme/m1.pem").exists());

    let (ok, out, _) = pki(&ca, &["issue-bridge"]);
    assert!(ok && out.contains("issued bridge iotp-bridge"), "{out}");
    let (ok, out, _) = pki(
        &ca,
        &["issue-broker", "--host", "localhost", "--host", "127.0.0.1"],
    );
    assert!(ok && out.contains("issued broker localhost"), "{out}");
    let (ok, out, _) = pki(&ca, &["rotate", "--tenant", "acme", "--device", "m1"]);
    assert!(ok && out.contains("issued device acme/m1"), "{out}");
    let (ok, out, _) = pki(&ca, &["revoke", "--tenant", "acme", "--device", "m1"]);
    assert!(ok && out.contains("revoked acme/m1"), "{out}");
    assert!(out.contains("SIGHUP"), "{out}");
    let crl = root.join("crl-copy.pem");
    let (ok, out, _) = pki(&ca, &["crl", "--out", crl.to_str().unwrap(), "--days", "7"]);
    assert!(ok && out.contains("valid 7 days"), "{out}");
    assert!(std::fs::read_to_string(&crl)
        .unwrap()
        .contains("BEGIN X509 CRL"));

    let (ok, out, _) = pki(&ca, &["list"]);
    assert!(ok);
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 4, "{out}");
    assert_eq!(
        rows.iter().filter(|r| r.contains(" revoked ")).count(),
        2,
        "{out}"
    );
    assert!(rows
        .iter()
        .any(|r| r.contains("bridge") && r.contains("valid")));
}

#[test]
fn bad_input_is_a_clear_error() {
    let root = scratch("errors");
    let ca = root.join("pki");
    let (ok, _, err) = pki(&ca, &["issue", "--tenant", "acme", "--device", "m1"]);
    assert!(!ok);
    assert!(
        err.contains("no CA in") && err.contains("iotp-pki init"),
        "{err}"
    );

    assert!(pki(&ca, &["init"]).0);
    let (ok, _, err) = pki(&ca, &["init"]);
    assert!(!ok && err.contains("already holds a CA"), "{err}");
    let (ok, _, err) = pki(&ca, &["revoke", "--tenant", "acme", "--device", "ghost"]);
    assert!(!ok && err.contains("unknown device acme/ghost"), "{err}");
    let (ok, _, err) = pki(&ca, &["rotate", "--tenant", "acme", "--device", "ghost"]);
    assert!(!ok && err.contains("unknown device acme/ghost"), "{err}");
    let (ok, _, err) = pki(&ca, &["revoke", "--serial", "abcdef"]);
    assert!(!ok && err.contains("unknown serial"), "{err}");
    let (ok, _, err) = pki(&ca, &["issue", "--tenant", "a/b", "--device", "m"]);
    assert!(!ok && err.contains("invalid tenant"), "{err}");

    // A registration that would fail issues nothing.
    let registry = root.join("registry.toml");
    std::fs::write(&registry, "").unwrap();
    let (ok, _, err) = pki(
        &ca,
        &[
            "issue",
            "--tenant",
            "acme",
            "--device",
            "m1",
            "--registry",
            registry.to_str().unwrap(),
            "--profile",
            "nope",
        ],
    );
    assert!(!ok && err.contains("unknown profile nope"), "{err}");
    let (_, out, _) = pki(&ca, &["list"]);
    assert_eq!(out.lines().count(), 1, "nothing issued: {out}");
    // --registry needs --profile.
    let (ok, _, err) = pki(
        &ca,
        &[
            "issue",
            "--tenant",
            "acme",
            "--device",
            "m1",
            "--registry",
            "r.toml",
        ],
    );
    assert!(!ok && err.contains("--profile"), "{err}");
}

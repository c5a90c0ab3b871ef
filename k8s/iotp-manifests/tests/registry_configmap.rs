//! The registry as Kubernetes mounts a ConfigMap (a directory, not subPath): the kubelet writes
//! each version into a new timestamped directory and swaps the `..data` symlink atomically;
//! `registry.toml` is a symlink through `..data`. The services' registry handle must see the
//! new version without a restart. This does what the kubelet's atomic writer does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::symlink;
use std::path::Path;

use iotp_contract::devices::RegistryHandle;
use iotp_manifests::root;

fn version(dir: &Path, name: &str, text: &str) {
    std::fs::create_dir_all(dir.join(name)).unwrap();
    std::fs::write(dir.join(name).join("registry.toml"), text).unwrap();
    // Atomic swap: a new symlink renamed over ..data.
    symlink(name, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
}

#[test]
fn a_registry_mounted_from_a_config_map_is_reloaded_when_the_config_map_changes() {
    let dir = std::env::temp_dir().join(format!("iotp-registry-cm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let shipped = std::fs::read_to_string(root().join("k8s/base/registry.toml")).unwrap();
    version(&dir, "..2026_12_04_10_00_00.1", &shipped);
    symlink("..data/registry.toml", dir.join("registry.toml")).unwrap();

    let handle = RegistryHandle::open(&dir.join("registry.toml")).unwrap();
    assert!(handle.current().device("demo", "dev-000009").is_some());
    assert!(handle.current().device("demo", "dev-000010").is_none());
    assert!(!handle.reload_if_changed().unwrap(), "nothing changed yet");

    // The handle compares modification times, which the kernel stamps from a coarse clock
    // (a few ms): two versions written within one tick look alike. The kubelet syncs a
    // ConfigMap at most about once a minute; here a pause stands for that.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let added = format!("{shipped}\n[[devices]]\ntenant = \"demo\"\nid = \"dev-000010\"\nprofile = \"climate-v1\"\n");
    version(&dir, "..2026_12_04_10_05_00.2", &added);
    assert!(
        handle.reload_if_changed().unwrap(),
        "the swapped version was not noticed"
    );
    assert!(handle.current().device("demo", "dev-000010").is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

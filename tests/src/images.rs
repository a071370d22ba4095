//! The container scenarios' image, made here from Debian's packages since no image registry is
//! reachable: a minimal bookworm root filesystem (`mmdebstrap`, about 150 s, cached as a tar)
//! imported into Podman as [`BASE_IMAGE`], and from there into containerd's `k8s.io` namespace.
//!
//! A minimal builder until `cargo xtask image` (branch k8s-image) makes the base: the scenarios
//! only call [`ensure_podman_image`] and [`ensure_containerd_image`], which build what is
//! missing and reuse what is there.

use std::{
    path::PathBuf,
    process::{Command, Output},
};

use crate::{TempDir, sh};

/// The image the container scenarios run (`podman images`, `ctr -n k8s.io images ls`).
pub const BASE_IMAGE: &str = "localhost/debian:bookworm-min";

/// The containerd namespace Kubernetes' CRI plugin uses, where the pod scenario runs.
pub const K8S_NAMESPACE: &str = "k8s.io";

/// Where the root filesystem tar is kept between runs: CONNTRACE_IMAGE_CACHE, or
/// /var/cache/conntrace-tests.
fn cache_dir() -> PathBuf {
    std::env::var_os("CONNTRACE_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/conntrace-tests"))
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

/// The cached Debian bookworm root filesystem (minbase and python3-minimal), made with
/// `mmdebstrap` when missing; written beside and renamed, so an interrupted build leaves none.
pub fn rootfs_tar() -> PathBuf {
    let dir = cache_dir();
    let tar = dir.join("bookworm-min-rootfs.tar");
    if tar.exists() {
        return tar;
    }
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let partial = dir.join(format!("bookworm-min-rootfs.{}.tar", std::process::id()));
    eprintln!("building {} with mmdebstrap (about 150 s)", tar.display());
    sh(&[
        "mmdebstrap",
        "--quiet",
        "--variant=minbase",
        "--include=python3-minimal",
        "bookworm",
        partial.to_str().expect("utf-8 path"),
    ]);
    std::fs::rename(&partial, &tar).expect("rename the root filesystem tar");
    tar
}

/// `podman` as the scenarios run it: runc (crun refuses this host's hybrid cgroups) and the
/// project's containers.conf (no default rlimits).
pub fn podman() -> Command {
    let conf = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("containers.conf");
    let mut c = Command::new("podman");
    c.env("CONTAINERS_CONF", conf)
        .args(["--runtime", "/usr/sbin/runc"]);
    c
}

/// [`BASE_IMAGE`] in Podman's store, imported from [`rootfs_tar`] when missing.
pub fn ensure_podman_image() -> &'static str {
    if output(podman().args(["image", "exists", BASE_IMAGE]))
        .status
        .success()
    {
        return BASE_IMAGE;
    }
    let tar = rootfs_tar();
    let out = output(podman().args(["import", tar.to_str().expect("utf-8 path"), BASE_IMAGE]));
    assert!(
        out.status.success(),
        "podman import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    BASE_IMAGE
}

/// [`BASE_IMAGE`] in containerd's `k8s.io` namespace, copied from Podman's store (`podman save`,
/// `ctr images import`) when missing.
pub fn ensure_containerd_image() -> &'static str {
    let listed = sh(&["ctr", "-n", K8S_NAMESPACE, "images", "ls", "-q"]);
    if listed.lines().any(|l| l.trim() == BASE_IMAGE) {
        return BASE_IMAGE;
    }
    ensure_podman_image();
    let dir = TempDir::new("ct-image");
    let archive = dir.join("image.tar");
    let path = archive.to_str().expect("utf-8 path");
    let out = output(podman().args(["save", "--format", "docker-archive", "-o", path, BASE_IMAGE]));
    assert!(
        out.status.success(),
        "podman save: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    sh(&["ctr", "-n", K8S_NAMESPACE, "images", "import", path]);
    BASE_IMAGE
}

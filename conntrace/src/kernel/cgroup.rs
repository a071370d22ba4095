//! The root of the cgroup v2 hierarchy, which the cgroup programs (`cgroup:connect4`,
//! `cgroup:connect6`) attach to so that they run for every process.
//!
//! Where the hierarchy is mounted differs: `/sys/fs/cgroup` on a unified host,
//! `/sys/fs/cgroup/unified` on a hybrid one (this project's host), nowhere on a minimal
//! system (a test VM's init). In order:
//!
//! 1. pid 1's mount of the hierarchy's root (`/` in `/proc/1/mountinfo`), through
//!    `/proc/1/root`: with the host's PID namespace (the DaemonSet, the container recipe)
//!    that is the host's root cgroup even from a container with a cgroup namespace of its
//!    own, whose `/sys/fs/cgroup` is only its own subtree;
//! 2. this process's own mount of it;
//! 3. the hierarchy mounted on a fresh directory just long enough to open its root, then
//!    detached (`umount2(MNT_DETACH)`) and the directory removed: the open directory keeps
//!    the root reachable, and the machine's mounts are as they were. Inside a cgroup
//!    namespace that root is the namespace's.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Why the root cgroup could not be opened: the call that failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupRootError {
    #[error("open {path}: {error}")]
    Open {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "mkdir {path} (a mount point for the cgroup v2 hierarchy, none being mounted): {error}"
    )]
    MountPoint {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("mount(2) cgroup2 on {path} (none being mounted): {error}")]
    Mount { path: PathBuf, error: nix::Error },
}

/// The root cgroup's directory, opened: see the module's docs for where it comes from.
pub fn open_root() -> Result<File, CgroupRootError> {
    let mounts = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/mountinfo"));
    if let Some(point) = mounts("1").ok().as_deref().and_then(cgroup2_root_mount) {
        let path = Path::new("/proc/1/root").join(point.strip_prefix("/").unwrap_or(&point));
        match File::open(&path) {
            Ok(root) => return Ok(root),
            Err(error) => tracing::debug!(%error, path = %path.display(), "pid 1's cgroup2 mount"),
        }
    }
    if let Some(path) = mounts("self").ok().as_deref().and_then(cgroup2_root_mount) {
        return File::open(&path).map_err(|error| CgroupRootError::Open { path, error });
    }
    mount_briefly()
}

/// The mount point of a cgroup2 mount of the hierarchy's root, from a `mountinfo` file
/// (`ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS... - FSTYPE SOURCE SUPER`, paths with `\ooo`
/// octal escapes).
fn cgroup2_root_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (head, tail) = line.split_once(" - ")?;
        if tail.split_whitespace().next() != Some("cgroup2") {
            return None;
        }
        let mut fields = head.split_whitespace().skip(3);
        let (root, point) = (fields.next()?, fields.next()?);
        (root == "/").then(|| PathBuf::from(unescape(point)))
    })
}

/// A `mountinfo` path with its `\ooo` escapes (space, tab, newline, backslash) decoded.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mounts the hierarchy on a fresh directory under /run, opens its root, detaches the mount
/// and removes the directory.
fn mount_briefly() -> Result<File, CgroupRootError> {
    let dir = Path::new("/run").join(format!("conntrace-cgroup2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|error| CgroupRootError::MountPoint {
        path: dir.clone(),
        error,
    })?;
    let mounted = mount(
        Some("cgroup2"),
        &dir,
        Some("cgroup2"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    );
    let opened = match mounted {
        Ok(()) => {
            let root = File::open(&dir).map_err(|error| CgroupRootError::Open {
                path: dir.clone(),
                error,
            });
            // The open root keeps the hierarchy reachable; the mount itself is not needed.
            if let Err(error) = umount2(&dir, MntFlags::MNT_DETACH) {
                tracing::warn!(%error, path = %dir.display(), "umount2 of the brief cgroup2 mount");
            }
            root
        }
        Err(error) => Err(CgroupRootError::Mount {
            path: dir.clone(),
            error,
        }),
    };
    if let Err(error) = std::fs::remove_dir(&dir) {
        tracing::warn!(%error, path = %dir.display(), "remove the brief cgroup2 mount point");
    }
    opened
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hierarchys_own_root_mount_is_chosen() {
        let hybrid = "\
25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec - cgroup2 cgroup2 rw
27 25 0:24 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu
";
        assert_eq!(
            cgroup2_root_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        // A container's view of its own subtree is not the root; a later root mount is.
        let nested = "\
40 30 0:23 /system.slice/x.scope /sys/fs/cgroup rw - cgroup2 cgroup2 rw
41 30 0:23 / /run/cg rw - cgroup2 cgroup2 rw
";
        assert_eq!(cgroup2_root_mount(nested), Some(PathBuf::from("/run/cg")));
        let v1_only = "27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_root_mount(v1_only), None);
        let spaced = "41 30 0:23 / /run/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_root_mount(spaced),
            Some(PathBuf::from("/run/my cgroups"))
        );
        assert_eq!(unescape(r"a\134b\011c\9"), "a\\b\tc\\9");
    }
}

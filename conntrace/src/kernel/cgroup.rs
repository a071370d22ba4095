//! The root of the cgroup v2 hierarchy, which the cgroup programs (`cgroup:connect4`,
//! `cgroup:connect6`) attach to so that they run for every process.
//!
//! Where the hierarchy is mounted differs: `/sys/fs/cgroup` on a unified host,
//! `/sys/fs/cgroup/unified` on a hybrid one (this project's host), nowhere on a minimal
//! system (a test VM's init). The mount whose root is the hierarchy's own (`/` in
//! `/proc/self/mountinfo`) is used; without one, the hierarchy is mounted on a fresh
//! directory just long enough to open its root, then detached (`umount2(MNT_DETACH)`) and the
//! directory removed: the open directory keeps the root reachable, and the machine's mounts
//! are as they were. Inside a cgroup namespace that root is the namespace's.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Why the root cgroup could not be opened: the call that failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupRootError {
    #[error("open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "mkdir {path} (a mount point for the cgroup v2 hierarchy, none being mounted): {source}"
    )]
    MountPoint {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount(2) cgroup2 on {path} (none being mounted): {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// The root cgroup's directory, opened: see the module's docs for where it comes from.
pub fn open_root() -> Result<File, CgroupRootError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if let Some(path) = cgroup2_root_mount(&info) {
        return File::open(&path).map_err(|source| CgroupRootError::Open { path, source });
    }
    mount_briefly()
}

/// The mount point of a cgroup2 mount of the hierarchy's root, from `/proc/self/mountinfo`
/// (`ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS... - FSTYPE SOURCE SUPER`).
fn cgroup2_root_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (head, tail) = line.split_once(" - ")?;
        if tail.split_whitespace().next() != Some("cgroup2") {
            return None;
        }
        let mut fields = head.split_whitespace().skip(3);
        let (root, point) = (fields.next()?, fields.next()?);
        (root == "/").then(|| PathBuf::from(point))
    })
}

/// Mounts the hierarchy on a fresh directory under /run, opens its root, detaches the mount
/// and removes the directory.
fn mount_briefly() -> Result<File, CgroupRootError> {
    let dir = Path::new("/run").join(format!("conntrace-cgroup2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| CgroupRootError::MountPoint {
        path: dir.clone(),
        source,
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
            let root = File::open(&dir).map_err(|source| CgroupRootError::Open {
                path: dir.clone(),
                source,
            });
            // The open root keeps the hierarchy reachable; the mount itself is not needed.
            if let Err(error) = umount2(&dir, MntFlags::MNT_DETACH) {
                tracing::warn!(%error, path = %dir.display(), "umount2 of the brief cgroup2 mount");
            }
            root
        }
        Err(source) => Err(CgroupRootError::Mount {
            path: dir.clone(),
            source,
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
    }
}

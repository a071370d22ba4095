//! Where the checkout may live. The guest (tests/vm/init) sees the host's root file system, but
//! mounts its own file systems over some of its directories: a fresh tmpfs on `/run` and
//! `/tmp`, a devtmpfs on `/dev` ([`FRESH`]), procfs, sysfs, the output share on `/ctout`.
//! Whatever of the run lies beneath a fresh mount (a checkout under `/tmp`, `/run/user/...`
//! or `/dev/shm`, a `target` symlinked there) would be hidden, so init binds it back over the
//! fresh mount: [`guest_list`] names those directories (`keep` lines). Beneath the directories
//! the guest must own ([`OWNED`]: `/proc`, `/sys`, `/run/netns`, `/ctout`) nothing can be
//! shown without taking from the guest what the run needs: [`check`] refuses them in one line.
//!
//! Paths are classified after resolving symlinks: what must be visible in the guest is the
//! directory itself. The guest only uses canonical paths (xtask resolves the runner, the
//! modules and the staged executables; cargo builds with the physical working directory, so
//! the paths compiled into the tests, CARGO_MANIFEST_DIR, are canonical too).

use std::{
    io,
    path::{Path, PathBuf},
};

/// Directories tests/vm/init mounts afresh over the host root (tmpfs, devtmpfs, and the tmpfs
/// on /dev/shm): a directory of the run beneath one is bound back over the fresh mount.
const FRESH: &[&str] = &["/run", "/tmp", "/dev"];

/// Directories the guest must own, and what it needs there.
const OWNED: &[(&str, &str)] = &[
    ("/proc", "its own procfs"),
    ("/sys", "its own sysfs"),
    (
        "/run/netns",
        "an empty /run/netns for the tests' network namespaces",
    ),
    ("/ctout", "the mount point of its output share"),
];

/// How the guest sees one directory of the run.
#[derive(Debug, PartialEq)]
enum Seen {
    /// Through the host root, as it is.
    Visible,
    /// Beneath a fresh mount: init binds it back.
    Rebound,
}

/// Where `path` (canonical; `what` names it in the message) stands in the guest, or the one
/// line that says why the run cannot use it and what to do.
fn classify(what: &str, path: &Path) -> Result<Seen, String> {
    let shown = path.display();
    let Some(text) = path.to_str().filter(|s| !s.contains(['\n', '\t'])) else {
        return Err(format!(
            "vm-test cannot run from here: {what} ({path:?}) has a newline, a tab or non-UTF-8 \
             bytes in its path, which the VM guest's path list cannot carry; clone the \
             repository into a directory whose path has none and run it there"
        ));
    };
    for (dir, need) in OWNED {
        if path.starts_with(dir) {
            return Err(format!(
                "vm-test cannot run from here: {what} is {shown}, under {dir}, where the VM \
                 guest needs {need}; clone the repository anywhere outside {dir} (/tmp works \
                 too) and run it there"
            ));
        }
    }
    let mut mounts = FRESH.iter().chain(OWNED.iter().map(|(dir, _)| dir));
    if let Some(dir) = mounts.find(|dir| Path::new(dir).starts_with(path)) {
        let example = Path::new(text).join("conntrace");
        return Err(format!(
            "vm-test cannot run from here: {what} is {shown}, which is or holds {dir}, a \
             directory the VM guest mounts afresh; clone the repository into a subdirectory \
             (e.g. {}) and run it there",
            example.display()
        ));
    }
    Ok(if FRESH.iter().any(|dir| path.starts_with(dir)) {
        Seen::Rebound
    } else {
        Seen::Visible
    })
}

/// `path` with its symlinks resolved; the part that does not exist yet (target/vm before the
/// first run) is appended to its nearest existing ancestor, resolved.
fn resolve(path: &Path) -> io::Result<PathBuf> {
    match path.canonicalize() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => match (path.parent(), path.file_name()) {
            (Some(parent), Some(name)) => Ok(resolve(parent)?.join(name)),
            _ => Err(e),
        },
        resolved => resolved,
    }
}

/// The directories init must bind back for the guest to see `dirs` (each `(what, path)`):
/// canonical, none beneath another. An error of one line when one of them cannot be shown.
pub fn rebinds(dirs: &[(&str, &Path)]) -> anyhow::Result<Vec<PathBuf>> {
    let mut keep = Vec::new();
    for (what, dir) in dirs {
        let path = resolve(dir).map_err(|e| anyhow::anyhow!("resolve {}: {e}", dir.display()))?;
        if classify(what, &path).map_err(anyhow::Error::msg)? == Seen::Rebound {
            keep.push(path);
        }
    }
    // Component order puts a directory before the ones beneath it.
    keep.sort();
    let mut outer: Vec<PathBuf> = Vec::new();
    for path in keep {
        if !outer.iter().any(|o| path.starts_with(o)) {
            outer.push(path);
        }
    }
    Ok(outer)
}

/// Refuses, before anything is built, a checkout whose directories the guest cannot show: the
/// one line says why and what to do.
pub fn check(root: &Path, vm_dir: &Path) -> anyhow::Result<()> {
    rebinds(&[("the checkout", root), ("its target/vm", vm_dir)]).map(drop)
}

/// The initramfs's `/paths` (tests/vm/init): one `KIND<TAB>PATH` a line, `runner` (the guest
/// runner), `modules` (the kernel's modules directory) and a `keep` line for each of `keep`.
pub fn guest_list(runner: &Path, modules: &Path, keep: &[PathBuf]) -> String {
    let mut lines = vec![
        format!("runner\t{}", runner.display()),
        format!("modules\t{}", modules.display()),
    ];
    lines.extend(keep.iter().map(|k| format!("keep\t{}", k.display())));
    lines.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(path: &str) -> Result<Seen, String> {
        classify("the checkout", Path::new(path))
    }

    #[test]
    fn checkouts_beneath_fresh_mounts_are_rebound_and_elsewhere_visible() {
        for path in [
            "/tmp/ctclone",
            "/run/user/1000/src/ct",
            "/dev/shm/ct",
            "/tmp/a b,c",
        ] {
            assert_eq!(seen(path), Ok(Seen::Rebound), "{path}");
        }
        for path in [
            "/work/main",
            "/home/u/ct",
            "/tmpx/ct",
            "/var/tmp/ct",
            "/runner/ct",
        ] {
            assert_eq!(seen(path), Ok(Seen::Visible), "{path}");
        }
    }

    #[test]
    fn checkouts_the_guest_cannot_show_are_refused_in_one_line_saying_what_to_do() {
        let cases = [
            (
                "/proc/1/root/ct",
                "under /proc, where the VM guest needs its own procfs",
            ),
            ("/sys/fs/cgroup/ct", "under /sys"),
            (
                "/run/netns/ct",
                "an empty /run/netns for the tests' network namespaces; clone \
              the repository anywhere outside /run/netns (/tmp works too)",
            ),
            ("/ctout/ct", "under /ctout"),
            (
                "/tmp",
                "is or holds /tmp, a directory the VM guest mounts afresh",
            ),
            ("/run", "is or holds /run,"),
            ("/dev", "(e.g. /dev/conntrace)"),
            ("/", "(e.g. /conntrace)"),
            ("/home/a\nb", "has a newline"),
        ];
        for (path, says) in cases {
            let why = seen(path).expect_err(path);
            assert!(why.contains(says), "{path}: {why}");
            assert!(
                why.starts_with("vm-test cannot run from here: the checkout"),
                "{why}"
            );
            assert!(why.contains("clone the repository"), "{why}");
            assert!(!why.contains('\n'), "{why}");
        }
    }

    /// A scratch directory under /tmp, removed on drop.
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }

    #[test]
    fn symlinks_are_resolved_before_classifying_and_nested_rebinds_merge() {
        let scratch = Scratch(PathBuf::from(format!(
            "/tmp/xtask-paths-{}",
            std::process::id()
        )));
        let real = scratch.0.join("real/ct");
        std::fs::create_dir_all(real.join("target")).unwrap();
        let link = scratch.0.join("link");
        std::os::unix::fs::symlink("real", &link).unwrap();
        // target/vm does not exist yet; the checkout is reached through a symlink.
        let vm = link.join("ct/target/vm");
        let keep = rebinds(&[("the checkout", &link.join("ct")), ("target/vm", &vm)]).unwrap();
        assert_eq!(keep, vec![real.clone()]);
        // A symlink under /tmp to a directory elsewhere needs no rebind.
        let here = Path::new(env!("CARGO_MANIFEST_DIR"))
            .canonicalize()
            .unwrap();
        std::os::unix::fs::symlink(&here, scratch.0.join("elsewhere")).unwrap();
        let keep = rebinds(&[("the checkout", &scratch.0.join("elsewhere"))]).unwrap();
        let expected = if classify("", &here) == Ok(Seen::Rebound) {
            vec![here]
        } else {
            vec![]
        };
        assert_eq!(keep, expected);
        // A directory not created yet is resolved through its nearest existing ancestor.
        let later = rebinds(&[("target/vm", &link.join("ct/target/vm"))]).unwrap();
        assert_eq!(later, vec![real.join("target/vm")]);
    }

    #[test]
    fn the_guest_list_has_one_kind_and_path_a_line() {
        let list = guest_list(
            Path::new("/tmp/c t/tests/vm/guest.sh"),
            Path::new("/tmp/c t/target/vm/kernels/k/root/lib/modules/6.12"),
            &[PathBuf::from("/tmp/c t")],
        );
        assert_eq!(
            list,
            "runner\t/tmp/c t/tests/vm/guest.sh\n\
             modules\t/tmp/c t/target/vm/kernels/k/root/lib/modules/6.12\n\
             keep\t/tmp/c t\n"
        );
    }
}

//! A cgroup (v2) whose `connect()`s a cgroup BPF program refuses: the `cgroup/connect4` and
//! `cgroup/connect6` hooks with a two-instruction program that returns 0 (`bpf_sys::return_imm(0)`), so that the kernel
//! fails each `connect()` of a process in the group with `EPERM` before any packet (what
//! Cilium's socket load-balancer or a host policy agent does to a refused destination).
//!
//! The programs are loaded and linked with the `bpf(2)` syscall directly ([`bpf_sys`], no
//! object file, no pin): closing the links detaches them, and the group is removed on drop.

use std::{fs, os::fd::OwnedFd, os::unix::process::CommandExt, path::PathBuf, process::Command};

use crate::bpf_sys::{
    self, BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT, BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
};

/// A test-made cgroup where every IPv4 and IPv6 `connect()` fails with `EPERM`.
pub struct ConnectRefused {
    dir: PathBuf,
    /// Where this group mounted the cgroup v2 hierarchy, none being mounted (a test VM's
    /// minimal init): unmounted on drop.
    mounted: Option<PathBuf>,
    _links: Vec<OwnedFd>,
}

impl ConnectRefused {
    /// Creates the group under the machine's cgroup v2 mount (mounted for it where there is
    /// none) and links the refusing programs to it. Panics with the syscall's error when the
    /// kernel refuses.
    pub fn create() -> Self {
        let (root, mounted) = match cgroup2_mount() {
            Some(root) => (root, None),
            None => {
                let at = PathBuf::from(format!("/run/{}", crate::fresh_name("ct-cgroup2-")));
                fs::create_dir_all(&at).expect("mkdir a cgroup2 mount point");
                crate::sh(&[
                    "mount",
                    "-t",
                    "cgroup2",
                    "none",
                    at.to_str().expect("utf-8"),
                ]);
                (at.clone(), Some(at))
            }
        };
        let dir = root.join(crate::fresh_name("conntrace-test-"));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let mut group = Self {
            dir,
            mounted,
            _links: Vec::new(),
        };
        let target = fs::File::open(&group.dir).expect("open the cgroup directory");
        for attach_type in [BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT] {
            let prog = bpf_sys::load(&bpf_sys::Load {
                prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                returns: 0,
                expected_attach_type: attach_type,
                attach_btf_id: 0,
                name: "ct_refuse",
            })
            .unwrap_or_else(|e| panic!("{e}"));
            let link = bpf_sys::link_create(&prog, &target, attach_type)
                .unwrap_or_else(|e| panic!("cgroup {}: {e}", group.dir.display()));
            group._links.push(link);
        }
        group
    }

    /// Makes `cmd`'s process join the group before it runs (it writes 0, itself, to the
    /// group's `cgroup.procs`), so that its children are in it too. The file is opened here:
    /// between fork and exec the child only makes the `write(2)` (no allocation, which could
    /// wait forever on a lock another thread of this process held at the fork).
    pub fn enter(&self, cmd: &mut Command) {
        let path = self.dir.join("cgroup.procs");
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        // SAFETY: the hook runs in the forked child before exec and makes one write(2) to a
        // descriptor it inherited (`procs` lives as long as `cmd`).
        unsafe {
            cmd.pre_exec(move || {
                let fd = std::os::fd::AsRawFd::as_raw_fd(&procs);
                match libc::write(fd, b"0".as_ptr().cast(), 1) {
                    1 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                }
            });
        }
    }
}

impl Drop for ConnectRefused {
    fn drop(&mut self) {
        // rmdir needs an empty group (every process that joined has exited: the tests wait
        // for them) and detaches its programs; the links close after this.
        if let Err(e) = fs::remove_dir(&self.dir) {
            eprintln!("rmdir {}: {e}", self.dir.display());
        }
        if let Some(at) = &self.mounted {
            // Not `sh`: a panic while a failed test unwinds would abort the run.
            match Command::new("umount").arg(at).status() {
                Ok(s) if s.success() => {
                    let _ = fs::remove_dir(at);
                }
                other => eprintln!("umount {}: {other:?}", at.display()),
            }
        }
    }
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a
/// hybrid host).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS ... - FSTYPE SOURCE SUPER"
        let (head, tail) = l.split_once(" - ")?;
        (tail.split_whitespace().next() == Some("cgroup2"))
            .then(|| head.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

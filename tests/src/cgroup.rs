//! A cgroup (v2) whose `connect()`s a cgroup BPF program refuses: the `cgroup/connect4` and
//! `cgroup/connect6` hooks with a two-instruction program that returns 0, so that the kernel
//! fails each `connect()` of a process in the group with `EPERM` before any packet (what
//! Cilium's socket load-balancer or a host policy agent does to a refused destination).
//!
//! The programs are loaded and linked with the `bpf(2)` syscall directly (no object file, no
//! pin): closing the links detaches them, and the group is removed on drop.

use std::{
    fs,
    os::fd::{FromRawFd, OwnedFd},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::Command,
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// `r0 = 0; exit`: refuse.
const REFUSE: [Insn; 2] = [
    // BPF_ALU64 | BPF_MOV | BPF_K
    Insn {
        code: 0xb7,
        regs: 0,
        off: 0,
        imm: 0,
    },
    // BPF_JMP | BPF_EXIT
    Insn {
        code: 0x95,
        regs: 0,
        off: 0,
        imm: 0,
    },
];

/// The head of `union bpf_attr` for `BPF_PROG_LOAD`, zero-padded to what the kernel reads.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    rest: [u64; 12],
}

/// The head of `union bpf_attr` for `BPF_LINK_CREATE`.
#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    rest: [u64; 8],
}

/// `bpf(cmd, attr)`: the new file descriptor, or the errno's text naming `what`.
fn bpf<T>(cmd: libc::c_long, attr: &T, what: &str) -> Result<OwnedFd, String> {
    // SAFETY: `attr` is a live, zero-padded `union bpf_attr` head of its own size; every
    // pointer in it points to memory that outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_ref(attr),
            size_of::<T>() as u32,
        )
    };
    if fd < 0 {
        return Err(format!("bpf({what}): {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the kernel just returned this descriptor, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

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
            let license = c"GPL";
            let mut load = ProgLoad {
                prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                insn_cnt: REFUSE.len() as u32,
                insns: REFUSE.as_ptr() as u64,
                license: license.as_ptr() as u64,
                expected_attach_type: attach_type,
                ..ProgLoad::default()
            };
            load.prog_name[..10].copy_from_slice(b"ct_refuse\0");
            let prog = bpf(BPF_PROG_LOAD, &load, "BPF_PROG_LOAD cgroup/connect")
                .unwrap_or_else(|e| panic!("{e}"));
            let link = LinkCreate {
                prog_fd: std::os::fd::AsRawFd::as_raw_fd(&prog) as u32,
                target_fd: std::os::fd::AsRawFd::as_raw_fd(&target) as u32,
                attach_type,
                ..LinkCreate::default()
            };
            let link = bpf(BPF_LINK_CREATE, &link, "BPF_LINK_CREATE cgroup")
                .unwrap_or_else(|e| panic!("{e}"));
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
fn cgroup2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS ... - FSTYPE SOURCE SUPER"
        let (head, tail) = l.split_once(" - ")?;
        (tail.split_whitespace().next() == Some("cgroup2"))
            .then(|| head.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

//! eBPF programs loaded and attached with the `bpf(2)` and `perf_event_open(2)` syscalls
//! directly, for the harness's own minimal programs (no object file, no pin): a test's
//! refusing cgroup program ([`crate::cgroup`]) and the bench's empty programs on conntrace's
//! hooks. Each function returns an owned descriptor (closing it detaches or unloads) or the
//! errno's text naming the syscall and its command.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use conntrace_common::perf::{PERF_FLAG_FD_CLOEXEC, PERF_TYPE_TRACEPOINT, PerfEventAttrV0};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_LINK_CREATE: libc::c_long = 28;

/// `enum bpf_prog_type` values used here.
pub const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
pub const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
pub const BPF_PROG_TYPE_TRACING: u32 = 26;

/// `enum bpf_attach_type` values used here.
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
pub const BPF_TRACE_RAW_TP: u32 = 23;
pub const BPF_TRACE_FENTRY: u32 = 24;
pub const BPF_TRACE_FEXIT: u32 = 25;

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// `r0 = IMM; exit`: the smallest program. Returning 0 as a cgroup `connect` program it
/// refuses every `connect()`, returning 1 it allows them; as a tracing program it does
/// nothing and returns.
pub const fn return_imm(imm: i32) -> [Insn; 2] {
    [
        // BPF_ALU64 | BPF_MOV | BPF_K
        Insn {
            code: 0xb7,
            regs: 0,
            off: 0,
            imm,
        },
        // BPF_JMP | BPF_EXIT
        Insn {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ]
}

/// The head of `union bpf_attr` for `BPF_PROG_LOAD`, up to `attach_btf_id`, zero-padded
/// beyond it (the kernel requires the bytes it does not know to be zero).
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
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
    rest: [u64; 8],
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

/// `union bpf_attr` for `BPF_RAW_TRACEPOINT_OPEN`.
#[repr(C)]
#[derive(Default)]
struct RawTracepointOpen {
    name: u64,
    prog_fd: u32,
    _pad: u32,
    cookie: u64,
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

/// What [`load`] loads: the program's type, its expected attach type and, for a tracing
/// program, the BTF id (in the kernel's `vmlinux` BTF) of the function or `btf_trace_*`
/// typedef it attaches to; what it returns.
pub struct Load<'a> {
    pub prog_type: u32,
    /// The program's return value ([`return_imm`]).
    pub returns: i32,
    pub expected_attach_type: u32,
    pub attach_btf_id: u32,
    /// At most 15 bytes (the kernel's `BPF_OBJ_NAME_LEN` less its NUL).
    pub name: &'a str,
}

/// Loads [`return_imm`]`(what.returns)` as `what` says (GPL, for the tracing helpers' sake:
/// it calls none).
pub fn load(what: &Load) -> Result<OwnedFd, String> {
    let license = c"GPL";
    let insns = return_imm(what.returns);
    let mut attr = ProgLoad {
        prog_type: what.prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: what.expected_attach_type,
        attach_btf_id: what.attach_btf_id,
        ..ProgLoad::default()
    };
    let name = &what.name.as_bytes()[..what.name.len().min(15)];
    attr.prog_name[..name.len()].copy_from_slice(name);
    bpf(
        BPF_PROG_LOAD,
        &attr,
        &format!("BPF_PROG_LOAD {}", what.name),
    )
}

/// Links program `prog` to `target` (a cgroup directory) at `attach_type`.
pub fn link_create(
    prog: &OwnedFd,
    target: &impl AsRawFd,
    attach_type: u32,
) -> Result<OwnedFd, String> {
    let attr = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: target.as_raw_fd() as u32,
        attach_type,
        ..LinkCreate::default()
    };
    bpf(BPF_LINK_CREATE, &attr, "BPF_LINK_CREATE")
}

/// Attaches a loaded tracing program (tp_btf, fentry or fexit: its target is in the program)
/// through `BPF_RAW_TRACEPOINT_OPEN` (Linux 5.5+ for the BTF-typed kinds).
pub fn raw_tracepoint_open(prog: &OwnedFd) -> Result<OwnedFd, String> {
    let attr = RawTracepointOpen {
        prog_fd: prog.as_raw_fd() as u32,
        ..RawTracepointOpen::default()
    };
    bpf(BPF_RAW_TRACEPOINT_OPEN, &attr, "BPF_RAW_TRACEPOINT_OPEN")
}

/// `_IOW('$', 8, __u32)`.
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
/// `_IO('$', 0)`.
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;

/// Where tracefs is mounted: its own mount point, else under debugfs (older set-ups mount
/// only that; aya looks in the same two places).
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The id of classic tracepoint `category:name`, from the first tracefs that lists it; the
/// error names every path tried.
pub fn tracepoint_id(category: &str, name: &str) -> Result<u64, String> {
    let mut tried = Vec::new();
    for root in TRACEFS {
        let path = format!("{root}/events/{category}/{name}/id");
        match std::fs::read_to_string(&path) {
            Ok(text) => return text.trim().parse().map_err(|e| format!("{path}: {e}")),
            Err(e) => tried.push(format!("{path}: {e}")),
        }
    }
    Err(tried.join("; "))
}

/// Attaches a loaded `BPF_PROG_TYPE_TRACEPOINT` program to the classic tracepoint
/// `category:name` (its id from tracefs, [`tracepoint_id`]): a perf event on CPU 0, whose
/// program the kernel runs wherever the tracepoint fires. The event's descriptor holds the
/// attachment.
pub fn perf_tracepoint_attach(
    prog: &OwnedFd,
    category: &str,
    name: &str,
) -> Result<OwnedFd, String> {
    let id = tracepoint_id(category, name)?;
    let attr = PerfEventAttrV0 {
        kind: PERF_TYPE_TRACEPOINT,
        size: size_of::<PerfEventAttrV0>() as u32,
        config: id,
        sample_period: 1,
        wakeup_events: 1,
        ..PerfEventAttrV0::default()
    };
    // SAFETY: perf_event_open(2) with a live attr of the size it states; pid -1, CPU 0, no
    // group.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            std::ptr::from_ref(&attr),
            -1 as libc::c_int,
            0 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(format!(
            "perf_event_open(tracepoint {category}:{name}): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the kernel just returned this descriptor, owned by no one else.
    let event = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    for (request, arg, what) in [
        (
            PERF_EVENT_IOC_SET_BPF,
            prog.as_raw_fd(),
            "PERF_EVENT_IOC_SET_BPF",
        ),
        (PERF_EVENT_IOC_ENABLE, 0, "PERF_EVENT_IOC_ENABLE"),
    ] {
        // SAFETY: ioctl(2) on the event's own descriptor with an integer argument.
        if unsafe { libc::ioctl(event.as_raw_fd(), request, arg) } < 0 {
            return Err(format!(
                "ioctl({what}, {category}:{name}): {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attr_heads_have_the_kernels_offsets() {
        // `attach_btf_id` at 108 in `union bpf_attr`'s BPF_PROG_LOAD member (uapi/linux/bpf.h).
        assert_eq!(std::mem::offset_of!(ProgLoad, expected_attach_type), 68);
        assert_eq!(std::mem::offset_of!(ProgLoad, attach_btf_id), 108);
        assert_eq!(std::mem::offset_of!(RawTracepointOpen, cookie), 16);
    }

    #[test]
    fn a_missing_tracepoint_names_every_tracefs_tried() {
        let err = tracepoint_id("no_such_category", "no_such_event").unwrap_err();
        for root in TRACEFS {
            assert!(
                err.contains(&format!("{root}/events/no_such_category/no_such_event/id")),
                "{err}"
            );
        }
    }
}

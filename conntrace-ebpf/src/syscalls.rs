//! `connect()` and `accept()`: the process behind a connection, and connect()'s own errors.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_user},
    macros::{map, tracepoint},
    maps::LruHashMap,
    programs::TracePointContext,
};
use conntrace_common::{
    AF_INET, AF_INET6, Accept, Config, ConnectError, EventKind, KernelOffsets, Tuple, programs,
};

use crate::{
    config, data::sock_ports, emit, field, header, kread, netns_of_sock, new_tuple, port_traced,
};

pub(crate) const SOCK_STREAM: u16 = 1;
pub(crate) const EINPROGRESS: i64 = 115;

/// `connect()` calls in flight, by pid_tgid, between syscall entry and exit.
#[derive(Clone, Copy)]
struct PendingConnect {
    fd: i64,
    tuple: Tuple,
}

#[map]
static CONNECTS: LruHashMap<u64, PendingConnect> = LruHashMap::with_max_entries(8192, 0);

/// The `struct sock *` behind file descriptor `fd` of the current task, with `socket.type`;
/// `None` when there is none or it could not be read.
#[inline(always)]
fn sock_of_fd(prog: u32, o: &KernelOffsets, fd: i64) -> Option<(u64, u16)> {
    if fd < 0 || o.task_files == KernelOffsets::MISSING || o.socket_sk == KernelOffsets::MISSING {
        return None;
    }
    // SAFETY: returns the current task pointer; only read through bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = kread(prog, task + o.task_files as u64)?;
    let fdt: u64 = kread(prog, files + o.files_fdt as u64)?;
    let max_fds: u32 = kread(prog, fdt + o.fdtable_max_fds as u64)?;
    if fd as u64 >= max_fds as u64 {
        return None;
    }
    let fd_array: u64 = kread(prog, fdt + o.fdtable_fd as u64)?;
    let file: u64 = kread(prog, fd_array + (fd as u64) * 8)?;
    let socket: u64 = kread(prog, file + o.file_private_data as u64)?;
    let kind: u16 = kread(prog, socket + o.socket_type as u64)?;
    Some((kread(prog, socket + o.socket_sk as u64)?, kind))
}

#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    const P: u32 = programs::SYS_ENTER_CONNECT;
    let Some(cfg) = config() else { return 0 };
    let s = &cfg.syscalls;
    let addr: u64 = field(P, &ctx, s.connect_addr);
    if addr == 0 {
        return 0;
    }
    let mut tuple = new_tuple(0, 0, 0);
    // SAFETY: user memory read through bpf_probe_read_user, which fails instead of faulting.
    let family = unsafe { bpf_probe_read_user(addr as *const u16) }.unwrap_or(0);
    let port = unsafe { bpf_probe_read_user((addr + 2) as *const u16) }.unwrap_or(0);
    if family == AF_INET {
        let a: [u8; 4] =
            unsafe { bpf_probe_read_user((addr + 4) as *const [u8; 4]) }.unwrap_or_default();
        tuple.daddr[..4].copy_from_slice(&a);
    } else if family == AF_INET6 {
        tuple.daddr =
            unsafe { bpf_probe_read_user((addr + 8) as *const [u8; 16]) }.unwrap_or_default();
    } else {
        return 0;
    }
    tuple.family = family;
    tuple.dport = u16::from_be(port);
    if !port_traced(cfg, tuple.dport, tuple.dport) {
        return 0;
    }
    let fd: u64 = field(P, &ctx, s.connect_fd);
    let pending = PendingConnect {
        fd: fd as i64,
        tuple,
    };
    // A full LRU map evicts the oldest entry; nothing to do on error.
    let _ignored = CONNECTS.insert(&bpf_get_current_pid_tgid(), &pending, 0);
    0
}

#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    const P: u32 = programs::SYS_EXIT_CONNECT;
    let Some(cfg) = config() else { return 0 };
    let key = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let Some(pending) = (unsafe { CONNECTS.get(&key) }).copied() else {
        return 0;
    };
    let _ignored = CONNECTS.remove(&key);
    let ret: i64 = field(P, &ctx, cfg.syscalls.exit_ret);
    if ret >= 0 || ret == -EINPROGRESS {
        return 0;
    }
    let (skaddr, kind) = sock_of_fd(P, &cfg.offsets, pending.fd).unwrap_or((0, 0));
    if skaddr != 0 && kind != SOCK_STREAM {
        return 0;
    }
    emit(ConnectError {
        header: header(
            EventKind::ConnectError,
            size_of::<ConnectError>(),
            netns_of_sock(P, &cfg.offsets, skaddr),
        ),
        skaddr,
        tuple: pending.tuple,
        ret: ret as i32,
        _pad: 0,
    });
    0
}

#[inline(always)]
fn accepted(prog: u32, ctx: &TracePointContext) -> u32 {
    let Some(cfg) = config() else { return 0 };
    let fd: i64 = field(prog, ctx, cfg.syscalls.exit_ret);
    if fd < 0 {
        return 0;
    }
    let Some((skaddr, kind)) = sock_of_fd(prog, &cfg.offsets, fd) else {
        return 0;
    };
    if skaddr == 0 || kind != SOCK_STREAM {
        return 0;
    }
    report_accept(prog, cfg, skaddr);
    0
}

/// The socket `accept()` returned, if on a traced port.
#[inline(always)]
pub(crate) fn report_accept(prog: u32, cfg: &Config, skaddr: u64) {
    let o = &cfg.offsets;
    let (lport, rport) = sock_ports(prog, o, skaddr);
    if !port_traced(cfg, lport, rport) {
        return;
    }
    emit(Accept {
        header: header(
            EventKind::Accept,
            size_of::<Accept>(),
            netns_of_sock(prog, o, skaddr),
        ),
        skaddr,
    });
}

#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    accepted(programs::SYS_EXIT_ACCEPT4, &ctx)
}

#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    accepted(programs::SYS_EXIT_ACCEPT, &ctx)
}

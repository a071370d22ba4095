//! `connect()` refused by a cgroup program before the socket left CLOSE: quiet mode on
//! kernels where fexit does not attach (this project's host).
//!
//! A host policy agent's `cgroup/connect4` or `connect6` program (Cilium's socket
//! load-balancer, a sandbox's egress policy) that returns 0 makes `connect()` fail with EPERM,
//! or with the errno it set (`bpf_set_retval`), before any route lookup, state change or
//! packet: no tracepoint sees it, only `connect()`'s own return (fexit, or the syscall
//! tracepoints when connections stream). These programs are attached to the root cgroup and
//! run after the programs of the socket's own cgroups (the kernel runs a cgroup's programs
//! before its ancestors', a cgroup's own in the order they were attached): `bpf_get_retval`
//! then says whether one of those refused. They always allow (return 1): a refusal stands
//! because any program refused, never because of this one. A program attached to the root
//! cgroup after conntrace runs after it, and its refusals are not seen. Userspace attaches
//! them on 6.1+ (`bpf_get_retval` in these programs).
//!
//! The socket is typed through `bpf_skc_to_tcp_sock`, so its namespace is a direct load and
//! its address the one the other programs key it by.

use aya_ebpf::{
    helpers::generated::{bpf_get_retval, bpf_skc_to_tcp_sock},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use conntrace_common::{
    AF_INET, AF_INET6, ConnectError, EventKind, header_flags::CGROUP_REFUSAL, sock_common,
};

use crate::{IPPROTO_TCP, config, emit, header, new_tuple, port_traced, sock::netns_of_typed_net};

/// `SOCK_STREAM`.
const SOCK_STREAM: u32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn cgroup_connect4(ctx: SockAddrContext) -> i32 {
    refused(&ctx, AF_INET);
    1
}

#[cgroup_sock_addr(connect6)]
pub fn cgroup_connect6(ctx: SockAddrContext) -> i32 {
    refused(&ctx, AF_INET6);
    1
}

/// Reports a TCP `connect()` to a traced port that a program before this one refused.
/// `family`: the hook's (an IPv6 socket's connect to an IPv4-mapped address is `connect6`'s).
#[inline(always)]
fn refused(ctx: &SockAddrContext, family: u16) {
    let a = ctx.sock_addr;
    // SAFETY: the program's context, read field by field (each a 4-byte load at the field's
    // offset, which the verifier rewrites to the kernel's own).
    let (kind, protocol, port) = unsafe {
        (
            (&raw const (*a).type_).read_volatile(),
            (&raw const (*a).protocol).read_volatile(),
            (&raw const (*a).user_port).read_volatile(),
        )
    };
    if kind != SOCK_STREAM || protocol != u32::from(IPPROTO_TCP) {
        return;
    }
    // `user_port` holds the port in network order in its low 16 bits.
    let dport = u16::from_be(port as u16);
    let Some(cfg) = config() else { return };
    if !port_traced(cfg, dport, dport) {
        return;
    }
    // SAFETY: reads this run's return value so far (0, or the errno a refusal set).
    let ret = unsafe { bpf_get_retval() };
    if ret >= 0 {
        return;
    }
    let mut tuple = new_tuple(family, 0, dport);
    // SAFETY: as above; the address fields of the hook's family.
    unsafe {
        if family == AF_INET {
            let d = (&raw const (*a).user_ip4).read_volatile();
            tuple.daddr.as_mut_ptr().cast::<u32>().write_unaligned(d);
        } else {
            let mut i = 0;
            while i < 4 {
                let d = (&raw const (*a).user_ip6[i]).read_volatile();
                tuple
                    .daddr
                    .as_mut_ptr()
                    .cast::<u32>()
                    .add(i)
                    .write_unaligned(d);
                i += 1;
            }
        }
    }
    // SAFETY: the context's socket (`PTR_TO_SOCKET`), which the helper takes; it returns the
    // socket as a BTF-typed `struct tcp_sock *`, or null.
    let sk = unsafe {
        let sock = (&raw const (*a).__bindgen_anon_1.sk).read_volatile();
        bpf_skc_to_tcp_sock(sock.cast()).cast::<u8>().cast_const()
    };
    let (skaddr, netns) = if sk.is_null() {
        (0, None)
    } else {
        // SAFETY: a BTF-typed socket: the verifier checks the offset against the type and
        // makes the load fault-safe.
        let net = unsafe { sk.add(sock_common::NET).cast::<*const u8>().read_volatile() };
        (sk as u64, netns_of_typed_net(net))
    };
    let mut header = header(EventKind::ConnectError, size_of::<ConnectError>(), netns);
    header.flags |= CGROUP_REFUSAL;
    emit(ConnectError {
        header,
        skaddr,
        tuple,
        ret,
        _pad: 0,
    });
}

//! Configuration written by userspace into the `CONFIG` map before any program is attached.
//!
//! Tracepoint record layouts and kernel structure offsets differ between kernels, so the eBPF
//! programs never hard-code them: userspace reads each tracepoint's `format` file and the
//! kernel's BTF at start-up and passes the offsets here.

use crate::user_pod;

/// Offset value meaning "this kernel's record has no such field".
pub const ABSENT: u16 = u16::MAX;

/// Where the connection's addresses and ports sit inside a tracepoint record.
///
/// Two forms exist: separate `sport`/`dport`/`family`/`saddr`/`daddr`/`saddr_v6`/`daddr_v6`
/// fields (ports in host order), or, when `sockaddr_src != ABSENT`, two `struct sockaddr_in6`
/// sized fields (family, port in network order, address), as `tcp:tcp_send_reset` has since 6.10.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TupleLayout {
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub saddr4: u16,
    pub daddr4: u16,
    pub saddr6: u16,
    pub daddr6: u16,
    pub sockaddr_src: u16,
    pub sockaddr_dst: u16,
    pub _pad: u16,
}

impl TupleLayout {
    pub const NONE: Self = Self {
        family: ABSENT,
        sport: ABSENT,
        dport: ABSENT,
        saddr4: ABSENT,
        daddr4: ABSENT,
        saddr6: ABSENT,
        daddr6: ABSENT,
        sockaddr_src: ABSENT,
        sockaddr_dst: ABSENT,
        _pad: 0,
    };
}

/// Field offsets of one tracepoint's record, as its `format` file gives them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracepointLayout {
    pub tuple: TupleLayout,
    pub skaddr: u16,
    pub skbaddr: u16,
    pub protocol: u16,
    pub oldstate: u16,
    pub newstate: u16,
    pub state: u16,
    pub error: u16,
    pub reason: u16,
    /// `skb:kfree_skb`: the dropping code's address, and the receiving socket (6.12+).
    pub location: u16,
    pub rx_sk: u16,
    /// `sock:sock_send_length`: the socket (`sk`) and the byte count or error (`ret`).
    pub sk: u16,
    pub ret: u16,
}

impl TracepointLayout {
    pub const NONE: Self = Self {
        tuple: TupleLayout::NONE,
        skaddr: ABSENT,
        skbaddr: ABSENT,
        protocol: ABSENT,
        oldstate: ABSENT,
        newstate: ABSENT,
        state: ABSENT,
        error: ABSENT,
        reason: ABSENT,
        location: ABSENT,
        rx_sk: ABSENT,
        sk: ABSENT,
        ret: ABSENT,
    };
}

/// Field offsets of the syscall tracepoints used for process attribution ([`ABSENT`] when this
/// kernel has no syscall tracepoints).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallLayout {
    /// `sys_enter_connect`: `fd`, `uservaddr`.
    pub connect_fd: u16,
    pub connect_addr: u16,
    /// `sys_exit_*`: `ret`.
    pub exit_ret: u16,
    pub _pad: u16,
}

impl SyscallLayout {
    pub const NONE: Self = Self {
        connect_fd: ABSENT,
        connect_addr: ABSENT,
        exit_ret: ABSENT,
        _pad: 0,
    };
}

/// Field offsets of a route lookup tracepoint's record (`fib:fib_table_lookup`,
/// `fib6:fib6_table_lookup`), from its `format` file; [`ABSENT`] when this kernel's record has
/// no such field (the program then reports nothing).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FibLayout {
    /// `u32 tb_id`: the routing table looked up.
    pub tb_id: u16,
    /// `int err`: 0, or the lookup's negative errno.
    pub err: u16,
    /// `int iif`: the input interface; `LOOPBACK_IFINDEX` (1) for an output route lookup.
    pub iif: u16,
    /// `u8 proto`: the flow's L4 protocol.
    pub proto: u16,
    /// `__u8 src[4]`/`[16]`, `__u8 dst[4]`/`[16]`: the flow's addresses.
    pub src: u16,
    pub dst: u16,
    /// `u16 sport`, `u16 dport`: the flow's ports, host order (0 for other protocols).
    pub sport: u16,
    pub dport: u16,
}

impl FibLayout {
    pub const NONE: Self = Self {
        tb_id: ABSENT,
        err: ABSENT,
        iif: ABSENT,
        proto: ABSENT,
        src: ABSENT,
        dst: ABSENT,
        sport: ABSENT,
        dport: ABSENT,
    };
}

/// Offsets inside kernel structures, resolved from BTF (`/sys/kernel/btf/vmlinux`).
///
/// A value of `u32::MAX` means the member was not found; the program then leaves the
/// corresponding fact (netns, process attribution) empty instead of reading garbage.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct sock` → `__sk_common.skc_net.net` (`struct net *`).
    pub sock_net: u32,
    /// `struct net` → `ns.inum`.
    pub net_inum: u32,
    /// `struct sock` → `__sk_common.skc_num` (local port, host order).
    pub sock_num: u32,
    /// `struct sock` → `__sk_common.skc_dport` (remote port, network order).
    pub sock_dport: u32,
    /// `struct sk_buff` → `dev`; `struct net_device` → `nd_net.net`.
    pub skb_dev: u32,
    pub netdev_net: u32,
    /// `struct task_struct` → `files`; `struct files_struct` → `fdt`;
    /// `struct fdtable` → `max_fds`, `fd`; `struct file` → `private_data`;
    /// `struct socket` → `type`, `sk`.
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
    pub socket_type: u32,
    pub socket_sk: u32,
    /// `struct sk_buff` → `head` (pointer) and `transport_header` (u16 offset from head).
    pub skb_head: u32,
    pub skb_transport_header: u32,
    /// `struct sk_buff` → `network_header` (u16 offset from head) and `sk`.
    pub skb_network_header: u32,
    pub skb_sk: u32,
    /// `struct sock` → `sk_err` (positive errno of a failed connection) and `sk_err_soft`
    /// (the error an ICMP left while the process held the socket).
    pub sock_err: u32,
    pub sock_err_soft: u32,
    /// `struct sk_buff` → `protocol` (L3 protocol, network order).
    pub skb_protocol: u32,
    /// `struct tcp_sock` → `bytes_received` (u64): non-zero once data has arrived.
    pub tcp_bytes_received: u32,
    /// `struct sk_buff` → `_skb_refdst` (the route, low bit a flag) and `struct dst_entry` →
    /// `dev`: an incoming packet's namespace once TCP has reused `skb->dev` as scratch space.
    pub skb_refdst: u32,
    pub dst_dev: u32,
    /// `struct sk_buff` → `len` (bytes of data: a TCP segment's payload where TCP hands it to
    /// IP) and `skb_iif` (the interface it arrived on; 0 for a locally generated packet).
    pub skb_len: u32,
    pub skb_iif: u32,
    /// `struct tcp_sock` → `mss_cache` (the current MSS).
    pub tcp_mss_cache: u32,
    /// `struct tcp_sock` → `sacked_out` (u32: segments the peer acknowledged selectively,
    /// SACK, above the first unacknowledged one).
    pub tcp_sacked_out: u32,
    /// `struct sock` → `sk_socket`: set while a process holds the socket (accepted).
    pub sock_socket: u32,
    /// `struct sock` → `sk_protocol` (u16, 5.6+).
    pub sock_protocol: u32,
    /// `struct sock` → `__sk_common.skc_v6_daddr` and `skc_v6_rcv_saddr` (16 bytes each).
    pub sock_v6_daddr: u32,
    pub sock_v6_rcv_saddr: u32,
    /// `struct inet_sock` → `inet_sport` (network order): the local port, still set when
    /// closing has released the bound port (`skc_num` is then 0).
    pub inet_sport: u32,
    /// `struct task_struct` → `nsproxy` and `struct nsproxy` → `net_ns`: the current task's
    /// network namespace, for events without a socket or packet (route lookups).
    pub task_nsproxy: u32,
    pub nsproxy_net_ns: u32,
    /// `struct sock` → `__sk_common.skc_state` (u8, `TCP_LISTEN` = 10), `sk_ack_backlog` and
    /// `sk_max_ack_backlog` (u32: a listener's accept queue and its limit).
    pub sock_state: u32,
    pub sock_ack_backlog: u32,
    pub sock_max_ack_backlog: u32,
    /// `struct socket` → `file`; `struct file` → `f_inode`; `struct inode` → `i_ino`: a
    /// socket's inode number (`socket:[INO]`).
    pub socket_file: u32,
    pub file_inode: u32,
    pub inode_ino: u32,
    /// `struct inet_connection_sock` → `icsk_accept_queue.rskq_accept_head` (the oldest
    /// `struct request_sock *` of a listener's accept queue); `struct request_sock` →
    /// `dl_next` (the next one) and `sk` (the child socket).
    pub icsk_accept_head: u32,
    pub reqsk_next: u32,
    pub reqsk_sk: u32,
    /// `struct task_struct` → `comm` (`char[16]`).
    pub task_comm: u32,
    /// `struct sock` → `sk_dst_cache` (the socket's cached route).
    pub sock_dst_cache: u32,
    /// `struct sock` → `sk_route_caps` (`netdev_features_t`: the route's device features,
    /// zeroed when a retransmission's route lookup fails).
    pub sock_route_caps: u32,
}

/// Where a route lookup's flow (`struct flowi4` or `struct flowi6`) keeps what the BTF-typed
/// route-lookup programs read, from the kernel's BTF; [`KernelOffsets::MISSING`] when it
/// lacks one (those programs are then not attached: the classic tracepoints serve).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowOffsets {
    /// `__fl_common.flowic_iif` (int): `LOOPBACK_IFINDEX` for an output lookup.
    pub iif: u32,
    /// `__fl_common.flowic_proto` (u8).
    pub proto: u32,
    /// `saddr`, `daddr` (4 or 16 bytes, network order).
    pub saddr: u32,
    pub daddr: u32,
    /// `uli.ports`: `dport` then `sport` (network order).
    pub ports: u32,
}

impl FlowOffsets {
    /// Whether every member was found.
    pub fn complete(&self) -> bool {
        [self.iif, self.proto, self.saddr, self.daddr, self.ports]
            .iter()
            .all(|&o| o != KernelOffsets::MISSING)
    }
}

/// Where the BTF-typed programs load `struct sock_common` members directly (the verifier needs
/// constant offsets): the layout every supported kernel has. Userspace attaches those programs
/// only when the running kernel's BTF agrees.
pub mod sock_common {
    /// `skc_daddr` (IPv4, network order).
    pub const DADDR: usize = 0;
    /// `skc_rcv_saddr` (IPv4, network order).
    pub const RCV_SADDR: usize = 4;
    /// `skc_portpair`: `skc_dport` (network order), then `skc_num` (host order).
    pub const PORTPAIR: usize = 12;
    /// `skc_family`.
    pub const FAMILY: usize = 16;
    /// `skc_net.net`: the socket's `struct net *`.
    pub const NET: usize = 48;
}

/// Where `struct sk_buff`'s owner is loaded directly by the BTF-typed `net_dev_queue`
/// program (after the 24-byte union of list links; the same from 4.x through 6.18). Userspace
/// attaches that program only where the kernel's BTF agrees.
pub mod sk_buff {
    /// `sk`: the owning socket (`struct sock *`), or null.
    pub const SK: usize = 24;
}

impl KernelOffsets {
    pub const MISSING: u32 = u32::MAX;
    /// Every offset missing: where the eBPF side's read-only copy starts before userspace
    /// writes it.
    pub const ALL_MISSING: Self = {
        // SAFETY: every field is a u32, so the struct is exactly these words, any value valid.
        unsafe {
            core::mem::transmute::<[u32; size_of::<Self>() / 4], Self>(
                [Self::MISSING; size_of::<Self>() / 4],
            )
        }
    };
}

/// `Config::flags`: trace every TCP port (no `--port` given).
pub const FLAG_ALL_PORTS: u32 = 1;
/// `Config::flags`: healthy connections stay in the kernel (no `--all`, no `--expect-comm`):
/// a connection's events reach userspace only once it fails, stalls or is reset, preceded by
/// its history.
pub const FLAG_QUIET: u32 = 2;

/// The single entry of the `CONFIG` array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub set_state: TracepointLayout,
    pub error_report: TracepointLayout,
    pub receive_reset: TracepointLayout,
    pub send_reset: TracepointLayout,
    pub retransmit: TracepointLayout,
    pub kfree_skb: TracepointLayout,
    pub data_ready: TracepointLayout,
    pub send_length: TracepointLayout,
    pub dev_queue: TracepointLayout,
    pub syscalls: SyscallLayout,
    /// `fib:fib_table_lookup` and `fib6:fib6_table_lookup`.
    pub fib: FibLayout,
    pub fib6: FibLayout,
    /// The same lookups' flows (`struct flowi4`, `struct flowi6`), for the BTF-typed programs.
    pub flow4: FlowOffsets,
    pub flow6: FlowOffsets,
    /// `struct fib6_result` → `fib6_type` (u8, an `RTN_*` route type: the IPv6 lookup's
    /// answer) and `struct fib6_table` → `tb6_id` (u32).
    pub fib6_type: u32,
    pub fib6_table_id: u32,
    pub offsets: KernelOffsets,
    pub flags: u32,
    /// `enum skb_drop_reason` value whose drops carry a kernel stack (NETFILTER_DROP: the stack
    /// says which netfilter hook dropped the packet); [`NO_STACK_REASON`] for none.
    pub stack_drop_reason: u32,
    /// Bytes waiting in the ring buffer from which a record wakes userspace up (a quarter of
    /// the ring); below it, records are submitted without a wake-up.
    pub wakeup_bytes: u32,
    /// Quiet mode: `--stall-timeout` in milliseconds (0: off). A connection established this
    /// long without data (client) or accept (server) does not close quietly.
    pub stall_timeout_ms: u32,
    /// Quiet mode: `enum skb_drop_reason` values of drops that are a normal part of TCP
    /// wherever they happen (QUEUE_PURGE, TCP_OLD_SEQUENCE, TCP_OLD_DATA), counted in the
    /// kernel instead of sent; [`NO_STACK_REASON`] fills unused slots and every slot when
    /// such drops are to be shown (`--show-normal-drops`).
    pub normal_drops: [u32; 4],
    /// The traced ports when there are at most [`INLINE_PORTS`] (compared in the program; no
    /// map look-up); `inline_port_count` of them are set. More ports: `PORTS` alone.
    pub inline_ports: [u16; INLINE_PORTS],
    pub inline_port_count: u32,
    pub _pad: u32,
}

/// Traced ports compared inline (`Config::inline_ports`).
pub const INLINE_PORTS: usize = 8;

/// `Config::stack_drop_reason` when no drop should carry a stack.
pub const NO_STACK_REASON: u32 = u32::MAX;

user_pod!(
    TupleLayout,
    TracepointLayout,
    SyscallLayout,
    FibLayout,
    KernelOffsets,
    Config
);

/// Names of the maps shared by both sides.
pub mod maps {
    pub const EVENTS: &str = "EVENTS";
    pub const LOST: &str = "LOST";
    /// Slots of the per-CPU `LOST` array.
    pub const LOST_COUNT: u32 = 0;
    pub const RING_PEAK: u32 = 1;
    /// 1 while an event of this CPU was lost and no later one of it reached the ring buffer
    /// (that one carries [`crate::header_flags::LOST_BEFORE`] and clears it).
    pub const LOST_PENDING: u32 = 2;
    /// Slots of `LOST`.
    pub const LOST_SLOTS: u32 = 3;
    pub const CONFIG: &str = "CONFIG";
    pub const PORTS: &str = "PORTS";
    /// Per-CPU array: kernel reads that failed, by program ([`crate::programs`]).
    pub const READ_FAILURES: &str = "READ_FAILURES";
}

/// Names of the eBPF side's globals userspace sets before loading.
pub mod globals {
    /// `KernelOffsets` as read-only data (the verifier sees each offset as a constant).
    pub const OFFSETS: &str = "OFFSETS";
}

/// The eBPF programs, by index into `READ_FAILURES`: each counts there the kernel reads it
/// could not make (the facts they would have given are then absent). Indexes are fixed.
pub mod programs {
    pub const INET_SOCK_SET_STATE: u32 = 0;
    pub const INET_SK_ERROR_REPORT: u32 = 1;
    pub const TCP_RECEIVE_RESET: u32 = 2;
    pub const TCP_SEND_RESET: u32 = 3;
    pub const TCP_RETRANSMIT_SKB: u32 = 4;
    pub const KFREE_SKB: u32 = 5;
    pub const SK_DATA_READY: u32 = 6;
    pub const SOCK_SEND_LENGTH: u32 = 7;
    pub const NET_DEV_QUEUE: u32 = 8;
    pub const SYS_ENTER_CONNECT: u32 = 9;
    pub const SYS_EXIT_CONNECT: u32 = 10;
    pub const SYS_EXIT_ACCEPT4: u32 = 11;
    pub const SYS_EXIT_ACCEPT: u32 = 12;
    pub const FEXIT_INET_STREAM_CONNECT: u32 = 13;
    pub const FENTRY_INET_ACCEPT: u32 = 14;
    pub const FENTRY_COOKIE_V4_INIT_SEQUENCE: u32 = 15;
    pub const FENTRY_COOKIE_V6_INIT_SEQUENCE: u32 = 16;
    pub const FEXIT_TCP_RCV_ESTABLISHED: u32 = 17;
    pub const FEXIT_TCP_SENDMSG: u32 = 18;
    pub const TP_BTF_INET_SOCK_SET_STATE: u32 = 19;
    pub const TP_BTF_NET_DEV_QUEUE: u32 = 20;
    pub const FIB_TABLE_LOOKUP: u32 = 21;
    pub const FIB6_TABLE_LOOKUP: u32 = 22;
    /// The `iter/tcp` accept-queue walk (run on demand, not attached to a hook).
    pub const ACCEPT_QUEUES: u32 = 23;
    pub const TP_BTF_FIB_TABLE_LOOKUP: u32 = 24;
    pub const TP_BTF_FIB6_TABLE_LOOKUP: u32 = 25;
    pub const TP_BTF_KFREE_SKB: u32 = 26;
    pub const CGROUP_CONNECT4: u32 = 27;
    pub const CGROUP_CONNECT6: u32 = 28;
    /// Entries of `READ_FAILURES`.
    pub const COUNT: u32 = 29;
    /// Their names (the programs' names in the object), by index.
    pub const NAMES: [&str; COUNT as usize] = [
        "inet_sock_set_state",
        "inet_sk_error_report",
        "tcp_receive_reset",
        "tcp_send_reset",
        "tcp_retransmit_skb",
        "kfree_skb",
        "sk_data_ready",
        "sock_send_length",
        "net_dev_queue",
        "sys_enter_connect",
        "sys_exit_connect",
        "sys_exit_accept4",
        "sys_exit_accept",
        "fexit_inet_stream_connect",
        "fentry_inet_accept",
        "fentry_cookie_v4_init_sequence",
        "fentry_cookie_v6_init_sequence",
        "fexit_tcp_rcv_established",
        "fexit_tcp_sendmsg",
        "tp_btf_inet_sock_set_state",
        "tp_btf_net_dev_queue",
        "fib_table_lookup",
        "fib6_table_lookup",
        "accept_queues",
        "tp_btf_fib_table_lookup",
        "tp_btf_fib6_table_lookup",
        "tp_btf_kfree_skb",
        "cgroup_connect4",
        "cgroup_connect6",
    ];
}

/// Default size of the event ring buffer in bytes (a power of two, a multiple of the page size).
pub const DEFAULT_RING_BYTES: u32 = 1 << 22;
/// Largest number of ports that can be filtered in the kernel.
pub const MAX_PORTS: u32 = 64;

#[cfg(test)]
mod tests {
    use super::KernelOffsets;

    #[test]
    fn all_missing_is_missing_in_every_field() {
        let o = KernelOffsets::ALL_MISSING;
        // First, middle and last fields: the struct is words only, so all the rest too.
        assert_eq!(o.sock_net, KernelOffsets::MISSING);
        assert_eq!(o.sock_protocol, KernelOffsets::MISSING);
        assert_eq!(o.task_comm, KernelOffsets::MISSING);
        assert_eq!(size_of::<KernelOffsets>() % 4, 0);
    }
}

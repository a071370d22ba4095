//! How a program reads the socket it was handed, and the current task's name.
//!
//! Two ways, one interface ([`SockRead`]):
//!
//! * [`Probed`]: through `bpf_probe_read_kernel` at the offsets in `CONFIG`, for the classic
//!   tracepoints, whose socket is a plain address;
//! * [`Typed`]: by direct loads from the BTF-typed `struct sock *` a `tp_btf` program is
//!   given, at the offsets in [`OFFSETS`]. Userspace writes those before loading, into
//!   read-only data the kernel freezes, so the verifier knows each as a constant, checks the
//!   load against the member's type and makes it fault-safe. A load is one instruction where
//!   the helper was a call and a copy: about 10 ns each on this project's host, and the
//!   lifecycle program read seven per connection.
//!
//! An offset userspace could not resolve is `KernelOffsets::MISSING`: the fact is absent
//! (`None`), as with the helper; the verifier, knowing the constant, skips the load's branch.

use aya_ebpf::helpers::generated::{bpf_get_current_task_btf, bpf_skc_to_tcp_sock};
use conntrace_common::{COMM_LEN, KernelOffsets, sock_common};

use crate::{current_comm, kread};

/// The kernel's offsets again (the same values as `CONFIG.offsets`), as read-only data
/// userspace sets before loading (the `OFFSETS` symbol): constants to the verifier.
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets::ALL_MISSING;

/// `OFFSETS.$field`, read so that the compiler keeps the load (the verifier turns it into
/// the constant).
macro_rules! offset {
    ($field:ident) => {
        // SAFETY: a read of a field of read-only data.
        unsafe { core::ptr::read_volatile(&raw const OFFSETS.$field) }
    };
}

/// The members of a socket the lifecycle and quiet-mode code read, each `None` when it
/// cannot be read here.
pub(crate) trait SockRead {
    /// The socket's address (maps are keyed by it).
    fn addr(&self) -> u64;
    /// `sk_protocol`.
    fn protocol(&self) -> Option<u16>;
    /// `sk_err`: the error that ended a connection (positive errno).
    fn err(&self) -> Option<i32>;
    /// `sk_err_soft`: an error an ICMP left while the process held the socket.
    fn err_soft(&self) -> Option<i32>;
    /// Whether neither error is set; false when `sk_err` cannot be read.
    fn no_error(&self) -> bool {
        self.err() == Some(0) && self.err_soft().is_none_or(|e| e == 0)
    }
    /// Whether a process holds the socket (`sk_socket` set): a server connection accepted.
    fn owned(&self) -> Option<bool>;
    /// `tcp_sock.bytes_received`.
    fn bytes_received(&self) -> Option<u64>;
    /// Whether the socket has a cached route (`sk_dst_cache` set).
    fn route_cached(&self) -> Option<bool>;
    /// Whether its last route lookup gave it a route (`sk_route_caps` nonzero).
    fn route_caps(&self) -> Option<bool>;
    /// Writes the current task's comm to `dst` in place (zeros when unreadable): built by
    /// value, it cost the classic lifecycle program a 16-byte copy on its stack, which 6.1's
    /// verifier limits.
    ///
    /// # Safety
    /// `dst` is valid for a write of `COMM_LEN` bytes.
    unsafe fn write_current_comm(&self, dst: *mut [u8; COMM_LEN]);
}

/// A socket at a plain address, read through the helper (counted for `prog` when it fails).
pub(crate) struct Probed<'a> {
    pub prog: u32,
    pub offsets: &'a KernelOffsets,
    pub sk: u64,
}

impl Probed<'_> {
    #[inline(always)]
    fn read<T>(&self, off: u32) -> Option<T> {
        if off == KernelOffsets::MISSING {
            return None;
        }
        kread(self.prog, self.sk + u64::from(off))
    }
}

impl SockRead for Probed<'_> {
    #[inline(always)]
    fn addr(&self) -> u64 {
        self.sk
    }
    #[inline(always)]
    fn protocol(&self) -> Option<u16> {
        self.read(self.offsets.sock_protocol)
    }
    #[inline(always)]
    fn err(&self) -> Option<i32> {
        self.read(self.offsets.sock_err)
    }
    #[inline(always)]
    fn err_soft(&self) -> Option<i32> {
        self.read(self.offsets.sock_err_soft)
    }
    #[inline(always)]
    fn no_error(&self) -> bool {
        let o = self.offsets;
        if o.sock_err != KernelOffsets::MISSING && o.sock_err_soft == o.sock_err + 4 {
            // `int sk_err, sk_err_soft;` side by side (every kernel so far): one read.
            return self.read::<u64>(o.sock_err) == Some(0);
        }
        self.err() == Some(0) && self.err_soft().is_none_or(|e| e == 0)
    }
    #[inline(always)]
    fn owned(&self) -> Option<bool> {
        self.read::<u64>(self.offsets.sock_socket).map(|s| s != 0)
    }
    #[inline(always)]
    fn bytes_received(&self) -> Option<u64> {
        self.read(self.offsets.tcp_bytes_received)
    }
    #[inline(always)]
    fn route_cached(&self) -> Option<bool> {
        self.read::<u64>(self.offsets.sock_dst_cache)
            .map(|d| d != 0)
    }
    #[inline(always)]
    fn route_caps(&self) -> Option<bool> {
        self.read::<u64>(self.offsets.sock_route_caps)
            .map(|c| c != 0)
    }
    #[inline(always)]
    unsafe fn write_current_comm(&self, dst: *mut [u8; COMM_LEN]) {
        // SAFETY: the helper writes COMM_LEN bytes into `dst` (zeros on failure).
        unsafe {
            aya_ebpf::helpers::generated::bpf_get_current_comm(dst.cast(), COMM_LEN as u32);
        }
    }
}

/// The BTF-typed `struct sock *` a `tp_btf` program was given (`prog` counts the helper
/// reads that remain: `tcp_sock` members, beyond the type the verifier checks loads against).
pub(crate) struct Typed {
    pub prog: u32,
    pub sk: *const u8,
}

/// Loads a `T` at `base + off`, `base` a BTF-typed pointer and `off` a constant from
/// [`OFFSETS`]; `None` for a missing offset.
#[inline(always)]
fn load<T>(base: *const u8, off: u32) -> Option<T> {
    if off == KernelOffsets::MISSING {
        return None;
    }
    // SAFETY: the verifier checks the constant offset against `base`'s BTF type (a member of
    // T's size) and turns the load into a fault-safe one. Volatile: one load per member.
    Some(unsafe { base.add(off as usize).cast::<T>().read_volatile() })
}

impl SockRead for Typed {
    #[inline(always)]
    fn addr(&self) -> u64 {
        self.sk as u64
    }
    #[inline(always)]
    fn protocol(&self) -> Option<u16> {
        load(self.sk, offset!(sock_protocol))
    }
    #[inline(always)]
    fn err(&self) -> Option<i32> {
        load(self.sk, offset!(sock_err))
    }
    #[inline(always)]
    fn err_soft(&self) -> Option<i32> {
        load(self.sk, offset!(sock_err_soft))
    }
    #[inline(always)]
    fn owned(&self) -> Option<bool> {
        load::<u64>(self.sk, offset!(sock_socket)).map(|s| s != 0)
    }
    #[inline(always)]
    fn bytes_received(&self) -> Option<u64> {
        // A `tcp_sock` member, past the `struct sock` the pointer is typed as.
        let off = offset!(tcp_bytes_received);
        if off == KernelOffsets::MISSING {
            return None;
        }
        match tcp_sock_of(self.sk) {
            Some(tp) => load(tp, off),
            None => kread(self.prog, self.sk as u64 + u64::from(off)),
        }
    }
    #[inline(always)]
    fn route_cached(&self) -> Option<bool> {
        load::<u64>(self.sk, offset!(sock_dst_cache)).map(|d| d != 0)
    }
    #[inline(always)]
    fn route_caps(&self) -> Option<bool> {
        load::<u64>(self.sk, offset!(sock_route_caps)).map(|c| c != 0)
    }
    #[inline(always)]
    unsafe fn write_current_comm(&self, dst: *mut [u8; COMM_LEN]) {
        let off = offset!(task_comm);
        if off == KernelOffsets::MISSING {
            // SAFETY: as the caller promised.
            unsafe { dst.write(current_comm()) };
            return;
        }
        // SAFETY: the helper returns the current task as a BTF-typed pointer (never null).
        let task = unsafe { bpf_get_current_task_btf() }
            .cast::<u8>()
            .cast_const();
        // `char comm[16]`, NUL-padded (set_task_comm): two word loads, two word stores.
        let (a, b) = (
            load::<u64>(task, off).unwrap_or(0),
            load::<u64>(task, off + 8).unwrap_or(0),
        );
        // SAFETY: two unaligned word stores inside the COMM_LEN bytes the caller gave.
        unsafe {
            dst.cast::<u64>().write_unaligned(a);
            dst.cast::<u64>().add(1).write_unaligned(b);
        }
    }
}

/// The namespace of the BTF-typed `struct net *` at `net` (`ns.inum`), by a direct load.
#[inline(always)]
pub(crate) fn netns_of_typed_net(net: *const u8) -> Option<u32> {
    if net.is_null() {
        return None;
    }
    load(net, offset!(net_inum))
}

/// Where a BTF-typed socket pointer came from, which decides whether a helper may take it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The program's own argument (a tracepoint's `struct sock *`).
    Argument,
    /// Loaded from another object (`skb->sk`): RCU-protected to the verifier, which refuses
    /// it to `bpf_skc_to_tcp_sock`.
    Loaded,
}

/// A BTF-typed socket's local and remote ports, as `data::sock_ports` reads them: `skc_num`
/// and `skc_dport` by one direct load of the port pair; for a closing socket whose bound port
/// is released, `inet_sport` (an `inet_sock` member, past the type the pointer has) through
/// [`tcp_sock_of`] where `origin` allows, else through `bpf_probe_read_kernel`. 0 for one
/// that could not be read.
#[inline(always)]
pub(crate) fn typed_sock_ports(prog: u32, sk: *const u8, origin: Origin) -> (u16, u16) {
    if sk.is_null() {
        return (0, 0);
    }
    // SAFETY: a BTF-typed `struct sock *`: the verifier checks the constant offset against
    // the type and makes the load fault-safe. skc_dport (network order) in the low half,
    // skc_num (host order) in the high half.
    let portpair = unsafe { sk.add(sock_common::PORTPAIR).cast::<u32>().read_volatile() };
    let mut local = (portpair >> 16) as u16;
    let remote = u16::from_be(portpair as u16);
    let sport = offset!(inet_sport);
    if local == 0 && sport != KernelOffsets::MISSING {
        let tp = if origin == Origin::Argument {
            tcp_sock_of(sk)
        } else {
            None
        };
        let read = match tp {
            Some(tp) => load::<u16>(tp, sport),
            None => kread::<u16>(prog, sk as u64 + u64::from(sport)),
        };
        local = read.map_or(0, u16::from_be);
    }
    (local, remote)
}

/// The BTF-typed socket `sk` as a `struct tcp_sock *` (`bpf_skc_to_tcp_sock`), through which
/// the verifier lets members past `struct sock` (an `inet_sock` or `tcp_sock` member, at an
/// offset from [`OFFSETS`]) be loaded directly; `None` for a socket that is not a full TCP
/// one (a request or time-wait socket, another protocol's). A helper that checks two fields
/// and returns its argument, where `bpf_probe_read_kernel` copied with page faults disabled:
/// the copy was the largest part of a run that read a closed socket's port (perf, on
/// another port's churn: three per connection, 0.2 % of its CPU).
#[inline(always)]
fn tcp_sock_of(sk: *const u8) -> Option<*const u8> {
    // SAFETY: `sk` is a BTF-typed socket pointer (what the helper's argument must be, which
    // the verifier checks); the helper returns it, or null.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast_mut().cast()) };
    (!tp.is_null()).then_some(tp.cast::<u8>().cast_const())
}

/// `skb->protocol` (host order) of a BTF-typed `struct sk_buff *`, by a direct load.
#[inline(always)]
pub(crate) fn typed_skb_protocol(skb: *const u8) -> Option<u16> {
    load::<u16>(skb, offset!(skb_protocol)).map(u16::from_be)
}

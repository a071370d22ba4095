//! `iter/tcp` program: the accept queues of the listeners on traced ports, walked on demand.
//!
//! The TCP iterator calls the program once per socket of the network namespace that the
//! reading task was in when it created the iterator file (listeners first, then the
//! established hash). For a LISTEN socket on a traced port, the program follows
//! `icsk_accept_queue.rskq_accept_head` → `request_sock.dl_next` (at most
//! [`ACCEPT_WALK_MAX`] entries) and writes one [`AcceptQueueEntry`] per child socket
//! (`req->sk`) with `bpf_seq_write`; a listener with an empty queue gets one record flagged
//! `NO_CHILD`. Nothing goes into the ring buffer: userspace reads the iterator file.
//!
//! The iterator holds the listener's socket lock, not the queue's `rskq_lock`: children may be
//! added or accepted during the walk. Every read goes through `bpf_probe_read_kernel` (offsets
//! from BTF, in `CONFIG`), so a race gives a stale entry, never a fault.

use aya_ebpf::{bindings::seq_file, helpers::generated::bpf_seq_write};
use conntrace_common::{
    ACCEPT_ENTRY_SIZE, ACCEPT_WALK_MAX, AcceptQueueEntry, KernelOffsets, accept::flags, programs,
    tcp::state,
};

use crate::{config, kread, port_traced};

const P: u32 = programs::ACCEPT_QUEUES;

/// `struct bpf_iter_meta` (kernel, since 5.8): only `seq` is read.
#[repr(C)]
struct IterMeta {
    seq: *mut seq_file,
}

/// `struct bpf_iter__tcp` (kernel, since 5.9): each member an 8-byte slot of the context.
#[repr(C)]
struct IterTcp {
    meta: *const IterMeta,
    /// `struct sock_common *`, NULL on the iterator's final call.
    sk_common: u64,
}

/// The program the TCP iterator runs for every socket. Not a macro-generated program:
/// aya-ebpf 0.2 has no `#[iter]`; the section name is what makes it an iterator for aya-obj.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn accept_queues(ctx: *mut core::ffi::c_void) -> i32 {
    let ctx = ctx as *const IterTcp;
    // SAFETY: the context is a `struct bpf_iter__tcp`; the verifier checks each 8-byte load
    // against its BTF (meta: trusted pointer; sk_common: may be NULL).
    let (meta, sk) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx).meta),
            core::ptr::read_volatile(&(*ctx).sk_common),
        )
    };
    if sk == 0 || meta.is_null() {
        return 0;
    }
    // SAFETY: `meta` is the kernel's `struct bpf_iter_meta`, `seq` its first member.
    let seq = unsafe { core::ptr::read_volatile(&(*meta).seq) };
    if let Some(listener) = listener(sk) {
        walk(seq, sk, listener);
    }
    0
}

/// What the records of one listener share.
#[derive(Clone, Copy)]
struct Listener {
    ino: u64,
    ack_backlog: u32,
    max_ack_backlog: u32,
    port: u16,
    flags: u32,
    /// The oldest `struct request_sock *` of its accept queue (0: empty).
    head: u64,
}

/// The listener facts of `sk`, when it is a LISTEN socket on a traced port.
#[inline(always)]
fn listener(sk: u64) -> Option<Listener> {
    let cfg = config()?;
    let o = &cfg.offsets;
    if o.sock_state == KernelOffsets::MISSING
        || o.sock_num == KernelOffsets::MISSING
        || o.icsk_accept_head == KernelOffsets::MISSING
    {
        return None;
    }
    if i32::from(kread::<u8>(P, sk + o.sock_state as u64)?) != state::LISTEN {
        return None;
    }
    let port: u16 = kread(P, sk + o.sock_num as u64)?;
    if !port_traced(cfg, port, port) {
        return None;
    }
    let mut flags = 0;
    let ino = inode(o, sk).unwrap_or_else(|| {
        flags |= flags::INO_UNREAD;
        0
    });
    let (ack_backlog, max_ack_backlog) = backlog(o, sk).unwrap_or_else(|| {
        flags |= flags::BACKLOG_UNREAD;
        (0, 0)
    });
    let head = kread::<u64>(P, sk + o.icsk_accept_head as u64).unwrap_or_else(|| {
        flags |= flags::CHILD_UNREAD;
        0
    });
    Some(Listener {
        ino,
        ack_backlog,
        max_ack_backlog,
        port,
        flags,
        head,
    })
}

/// `sk->sk_socket->file->f_inode->i_ino`.
#[inline(always)]
fn inode(o: &KernelOffsets, sk: u64) -> Option<u64> {
    if o.sock_socket == KernelOffsets::MISSING
        || o.socket_file == KernelOffsets::MISSING
        || o.file_inode == KernelOffsets::MISSING
        || o.inode_ino == KernelOffsets::MISSING
    {
        return None;
    }
    let socket: u64 = kread(P, sk + o.sock_socket as u64)?;
    let file: u64 = kread(P, socket + o.socket_file as u64)?;
    let inode: u64 = kread(P, file + o.file_inode as u64)?;
    kread(P, inode + o.inode_ino as u64)
}

/// `sk_ack_backlog` and `sk_max_ack_backlog`.
#[inline(always)]
fn backlog(o: &KernelOffsets, sk: u64) -> Option<(u32, u32)> {
    if o.sock_ack_backlog == KernelOffsets::MISSING
        || o.sock_max_ack_backlog == KernelOffsets::MISSING
    {
        return None;
    }
    Some((
        kread(P, sk + o.sock_ack_backlog as u64)?,
        kread(P, sk + o.sock_max_ack_backlog as u64)?,
    ))
}

/// Writes the records of listener `sk`: one per child in its queue, or one `NO_CHILD`.
#[inline(always)]
fn walk(seq: *mut seq_file, sk: u64, l: Listener) {
    let Some(cfg) = config() else { return };
    let o = &cfg.offsets;
    let mut entry = AcceptQueueEntry {
        listener_sk: sk,
        child_sk: 0,
        listener_ino: l.ino,
        ack_backlog: l.ack_backlog,
        max_ack_backlog: l.max_ack_backlog,
        port: l.port,
        position: 0,
        flags: l.flags,
    };
    if l.head == 0 || o.reqsk_next == KernelOffsets::MISSING || o.reqsk_sk == KernelOffsets::MISSING
    {
        entry.flags |= flags::NO_CHILD;
        write(seq, &entry);
        return;
    }
    let mut req = l.head;
    for position in 0..ACCEPT_WALK_MAX {
        entry.position = position;
        entry.flags = l.flags;
        let child = kread::<u64>(P, req + o.reqsk_sk as u64);
        let next = kread::<u64>(P, req + o.reqsk_next as u64);
        match (child, next) {
            (Some(child), Some(next)) => {
                entry.child_sk = child;
                if next != 0 && position + 1 == ACCEPT_WALK_MAX {
                    entry.flags |= flags::TRUNCATED;
                }
                write(seq, &entry);
                if next == 0 {
                    return;
                }
                req = next;
            }
            _ => {
                entry.child_sk = 0;
                entry.flags |= flags::CHILD_UNREAD;
                write(seq, &entry);
                return;
            }
        }
    }
}

/// Appends `entry` to the iterator's output. A full buffer (-E2BIG on read) is the reader's
/// to report: nothing to count here.
#[inline(always)]
fn write(seq: *mut seq_file, entry: &AcceptQueueEntry) {
    // SAFETY: `seq` is the iterator's seq_file from its meta; `entry` is initialised stack
    // memory of ACCEPT_ENTRY_SIZE bytes.
    unsafe {
        bpf_seq_write(
            seq,
            (entry as *const AcceptQueueEntry).cast(),
            ACCEPT_ENTRY_SIZE as u32,
        );
    }
}

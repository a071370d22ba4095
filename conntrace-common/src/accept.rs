//! Records of the `accept_queues` iterator (`iter/tcp`): every connection waiting in the accept
//! queue of a listener on a traced port, with the listener that holds it.
//!
//! The iterator walks the network namespace of the task that creates the iterator file and
//! writes, with `bpf_seq_write`, a stream of fixed-size [`AcceptQueueEntry`] records in host
//! byte order, without a header: one per queued child socket, oldest (next to be accepted)
//! first, and one with [`flags::NO_CHILD`] for a listener whose queue is empty. In an
//! SO_REUSEPORT group each listener socket has its own queue: the records tell which one holds
//! a given child.

use core::mem::size_of;

/// At most this many children are written per listener (the walk is a bounded loop); a longer
/// queue ends with a record flagged [`flags::TRUNCATED`].
pub const ACCEPT_WALK_MAX: u16 = 256;

/// One child socket in a listener's accept queue (or, with [`flags::NO_CHILD`], a listener
/// with none). 40 bytes, host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AcceptQueueEntry {
    /// The listener's `struct sock *` (kernel address).
    pub listener_sk: u64,
    /// The child's `struct sock *` (`request_sock.sk`): the address the lifecycle events of
    /// the connection carry. 0 with [`flags::NO_CHILD`] or [`flags::CHILD_UNREAD`].
    pub child_sk: u64,
    /// Inode of the listener's socket (`sk->sk_socket->file->f_inode->i_ino`): what `ss -e`
    /// shows as `ino:` and `/proc/PID/fd/N` links to as `socket:[INO]`. 0 when unread.
    pub listener_ino: u64,
    /// The listener's `sk_ack_backlog` (connections waiting for accept(), what `ss -ltn` shows
    /// as Recv-Q) and `sk_max_ack_backlog` (the listen() backlog, Send-Q).
    pub ack_backlog: u32,
    pub max_ack_backlog: u32,
    /// The listener's local port (`skc_num`, host order).
    pub port: u16,
    /// The child's position in the queue: 0 is accepted next.
    pub position: u16,
    /// [`flags`] bits.
    pub flags: u32,
}

/// Size of one record in the iterator's output, in bytes.
pub const ACCEPT_ENTRY_SIZE: usize = size_of::<AcceptQueueEntry>();

const _: () = assert!(ACCEPT_ENTRY_SIZE == 40);

/// `AcceptQueueEntry::flags` bits.
pub mod flags {
    /// The listener's queue is empty: the record describes the listener only.
    pub const NO_CHILD: u32 = 1 << 0;
    /// The listener's socket inode could not be read (`listener_ino` is 0).
    pub const INO_UNREAD: u32 = 1 << 1;
    /// `ack_backlog`/`max_ack_backlog` could not be read (both 0).
    pub const BACKLOG_UNREAD: u32 = 1 << 2;
    /// The queue could not be read further at this position: `child_sk` is 0, the walk ends.
    pub const CHILD_UNREAD: u32 = 1 << 3;
    /// The walk stopped after [`super::ACCEPT_WALK_MAX`] children: the queue is longer.
    pub const TRUNCATED: u32 = 1 << 4;
}

impl AcceptQueueEntry {
    /// The record at the start of `bytes`; `None` when fewer than [`ACCEPT_ENTRY_SIZE`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < ACCEPT_ENTRY_SIZE {
            return None;
        }
        // SAFETY: length checked; the type is plain old data, any bit pattern is valid.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }

    /// The record's bytes, exactly as the iterator writes them.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `#[repr(C)]` plain old data without implicit padding.
        unsafe {
            core::slice::from_raw_parts((self as *const Self).cast::<u8>(), ACCEPT_ENTRY_SIZE)
        }
    }
}

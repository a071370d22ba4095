//! The `accept_queues` iterator (`iter/tcp`, conntrace-ebpf's `accept_queues.rs`): which
//! listener socket holds each connection waiting in an accept queue. Loaded at start-up with
//! the other programs but attached to no hook: [`AcceptQueues::run`] reads it on demand, in
//! one network namespace, when a verdict needs it.
//!
//! An `iter/tcp` iterator walks the network namespace of the task that creates its file
//! (`BPF_ITER_CREATE`), so each run happens in a short-lived thread that first enters the
//! namespace; the caller's namespace never changes (as in `host::sockdiag`).

use std::{
    borrow::Cow,
    io::{self, Read as _},
    path::Path,
};

use aya::{
    Btf, Ebpf,
    programs::{Iter, ProgramError, links::LinkError},
};
use conntrace_common::{ACCEPT_ENTRY_SIZE, AcceptQueueEntry};

use super::hooks::AttachError;
use crate::host::netns::{self, EnterError};

/// The program's name in the eBPF object (and in the `ready` record).
pub const PROGRAM: &str = "accept_queues";
/// How the `ready` record shows where it attaches.
pub const ATTACH: &str = "iter:tcp";

/// The largest output read from one run: 16 MiB, about 400 000 records (a bound on memory and
/// time should a namespace hold far more queued connections than any real one).
const MAX_OUTPUT: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum IterError {
    #[error(transparent)]
    Enter(#[from] EnterError),
    #[error("attach the iterator (bpf(BPF_LINK_CREATE)): {0}")]
    Attach(#[source] ProgramError),
    #[error("create the iterator file (bpf(BPF_ITER_CREATE)): {0}")]
    Create(#[source] LinkError),
    #[error("read(2) the iterator file: {0}")]
    Read(#[source] io::Error),
    #[error(
        "iterator output of {len} bytes is not a whole number of {ACCEPT_ENTRY_SIZE}-byte records"
    )]
    Partial { len: usize },
}

/// The loaded iterator program, owned apart from the [`Ebpf`] object so that the host
/// look-ups can run it from the engine.
#[derive(Debug)]
pub struct AcceptQueues {
    program: Iter,
}

impl AcceptQueues {
    /// Loads the program from `ebpf` for iterator type `tcp` (kernel function
    /// `bpf_iter_tcp`, 5.9+) against the kernel's `btf`. The error names the failed step; its
    /// [`AttachError::summary`] is what the `ready` record shows.
    pub fn load(ebpf: &mut Ebpf, btf: Option<&Btf>) -> Result<Self, AttachError> {
        let program = ebpf
            .program_mut(PROGRAM)
            .ok_or(AttachError::NotInObject(PROGRAM))?;
        let iter: &mut Iter = program
            .try_into()
            .map_err(|source| AttachError::WrongType {
                program: PROGRAM,
                source,
            })?;
        let load = |source| AttachError::Load {
            hook: ATTACH.to_owned(),
            source,
        };
        iter.load("tcp", btf.ok_or(AttachError::NoBtf)?)
            .map_err(load)?;
        // A handle of its own on the loaded program (a second fd, from its id): the `Ebpf`
        // object stays with the tracer, this one goes to the listener look-ups.
        let info = iter.info().map_err(load)?;
        let program = Iter::from_program_info(info, Cow::Borrowed(PROGRAM)).map_err(load)?;
        Ok(Self { program })
    }

    /// Runs the iterator in the network namespace that `ns_path` opens (`/proc/PID/ns/net`,
    /// `/run/netns/NAME`) and returns its records: every child socket queued on a listener of
    /// a traced port, and a `NO_CHILD` record for each such listener with an empty queue.
    /// Blocking, one walk of the namespace's TCP sockets; needs CAP_SYS_ADMIN for setns().
    pub fn run(&mut self, ns_path: &Path) -> Result<Vec<AcceptQueueEntry>, IterError> {
        let ns = netns::open(ns_path, None)?;
        let program = &mut self.program;
        let bytes = netns::run_in(&ns, ns_path, "accept-queues", || read_iterator(program))??;
        decode(&bytes)
    }
}

/// Attaches `program` (a new iterator link), creates the iterator file in the current
/// thread's network namespace and reads it to the end. The link and the file close on return.
fn read_iterator(program: &mut Iter) -> Result<Vec<u8>, IterError> {
    let id = program.attach().map_err(IterError::Attach)?;
    let link = program.take_link(id).map_err(IterError::Attach)?;
    let file = link.into_file().map_err(IterError::Create)?;
    let mut bytes = Vec::new();
    file.take(MAX_OUTPUT)
        .read_to_end(&mut bytes)
        .map_err(IterError::Read)?;
    Ok(bytes)
}

/// Splits the iterator's output into its fixed-size records (see [`AcceptQueueEntry`]).
/// Output that does not end on a record boundary is refused whole.
pub fn decode(bytes: &[u8]) -> Result<Vec<AcceptQueueEntry>, IterError> {
    if !bytes.len().is_multiple_of(ACCEPT_ENTRY_SIZE) {
        return Err(IterError::Partial { len: bytes.len() });
    }
    Ok(bytes
        .chunks_exact(ACCEPT_ENTRY_SIZE)
        .filter_map(AcceptQueueEntry::from_bytes)
        .collect())
}

#[cfg(test)]
mod tests {
    use conntrace_common::accept::flags;

    use super::*;

    fn entry(child_sk: u64, position: u16, flags: u32) -> AcceptQueueEntry {
        AcceptQueueEntry {
            listener_sk: 0xffff_8883_e298_d340,
            child_sk,
            listener_ino: 89157,
            ack_backlog: 12,
            max_ack_backlog: 128,
            port: 3306,
            position,
            flags,
        }
    }

    #[test]
    fn decodes_records_in_order() {
        let records = [
            entry(0xffff_8883_e298_9bc0, 0, 0),
            entry(0xffff_8883_e298_8000, 1, 0),
            AcceptQueueEntry {
                listener_sk: 0xffff_8883_eb72_5c80,
                listener_ino: 88687,
                ack_backlog: 0,
                ..entry(0, 0, flags::NO_CHILD)
            },
        ];
        let bytes: Vec<u8> = records.iter().flat_map(|r| r.as_bytes().to_vec()).collect();
        assert_eq!(bytes.len(), 3 * 40);
        assert_eq!(decode(&bytes).unwrap(), records);
        assert_eq!(decode(&[]).unwrap(), []);
    }

    #[test]
    fn wire_layout_is_fixed() {
        let bytes = entry(0x1122_3344_5566_7788, 5, flags::TRUNCATED)
            .as_bytes()
            .to_vec();
        let u64_at = |i: usize| u64::from_ne_bytes(bytes[i..i + 8].try_into().unwrap());
        let u32_at = |i: usize| u32::from_ne_bytes(bytes[i..i + 4].try_into().unwrap());
        let u16_at = |i: usize| u16::from_ne_bytes(bytes[i..i + 2].try_into().unwrap());
        assert_eq!(u64_at(0), 0xffff_8883_e298_d340, "listener_sk");
        assert_eq!(u64_at(8), 0x1122_3344_5566_7788, "child_sk");
        assert_eq!(u64_at(16), 89157, "listener_ino");
        assert_eq!((u32_at(24), u32_at(28)), (12, 128), "backlogs");
        assert_eq!((u16_at(32), u16_at(34)), (3306, 5), "port, position");
        assert_eq!(u32_at(36), flags::TRUNCATED);
    }

    #[test]
    fn a_partial_record_is_refused() {
        let mut bytes = entry(1, 0, 0).as_bytes().to_vec();
        bytes.extend_from_slice(&entry(2, 1, 0).as_bytes()[..39]);
        let err = decode(&bytes).unwrap_err();
        assert!(matches!(err, IterError::Partial { len: 79 }), "{err:?}");
        assert!(err.to_string().contains("40-byte records"), "{err}");
    }
}

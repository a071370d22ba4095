//! Userspace's side of quiet mode's maps (`conntrace_common::quiet`): the kernel's counts of
//! what it kept, the connections it follows (read in batches), and the sockets userspace asks
//! it to report.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::{Array, HashMap, IterableMap as _, MapData, MapError, PerCpuArray};
use conntrace_common::{
    Tuple,
    quiet::{History, LATENCY_BUCKETS, NORMAL_DROP_SLOTS, counts, maps as names, watching},
};
use tracing::debug;

use super::{LoadError, take_map};

/// What the kernel counted instead of sending events, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCounts {
    /// Handshakes completed on traced ports: (client side, server side).
    pub established: (u64, u64),
    /// Connections that closed healthy without reaching userspace.
    pub closed_quiet: u64,
    /// Histories sent to userspace.
    pub flushed: u64,
    /// Connections that found the kernel's table full and streamed instead.
    pub conns_full: u64,
    /// Client handshake times: (bucket, count) for buckets with a count.
    pub latency: Vec<(u32, u64)>,
    /// Normal drops of traced ports: (`enum skb_drop_reason` value, count).
    pub normal_drops: Vec<(u32, u64)>,
}

/// Why the kernel's table of followed connections could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("bpf(BPF_MAP_LOOKUP_BATCH) on CONNS: {0}")]
    Lookup(#[source] std::io::Error),
}

/// `BPF_MAP_LOOKUP_BATCH` (5.6+).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries read per system call.
const BATCH: usize = 1024;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Quiet mode's maps.
pub struct QuietMaps {
    conns: HashMap<MapData, u64, History>,
    watch: HashMap<MapData, u64, u64>,
    watching: Array<MapData, u32>,
    /// Whether `watching` was set.
    watched: bool,
    watch_tuples: HashMap<MapData, Tuple, u8>,
    /// The attempts open for each tuple in `watch_tuples`.
    tuples: std::collections::HashMap<Tuple, u32>,
    tuple_failures: u64,
    counts: PerCpuArray<MapData, u64>,
    latency: PerCpuArray<MapData, u64>,
    normal_drops: PerCpuArray<MapData, u64>,
    keys: Vec<u64>,
    values: Vec<History>,
}

impl QuietMaps {
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, LoadError> {
        Ok(Self {
            conns: take_map(ebpf, names::CONNS)?,
            watch: take_map(ebpf, names::WATCH)?,
            watching: take_map(ebpf, names::WATCHING)?,
            watched: false,
            watch_tuples: take_map(ebpf, names::WATCH_TUPLES)?,
            tuples: std::collections::HashMap::new(),
            tuple_failures: 0,
            counts: take_map(ebpf, names::COUNTS)?,
            latency: take_map(ebpf, names::LATENCY)?,
            normal_drops: take_map(ebpf, names::NORMAL_DROPS)?,
            keys: vec![0; BATCH],
            values: vec![History::default(); BATCH],
        })
    }

    /// The kernel's counts so far.
    pub fn counts(&self) -> Result<KernelCounts, MapError> {
        let sum = |map: &PerCpuArray<MapData, u64>, i: u32| -> Result<u64, MapError> {
            Ok(map.get(&i, 0)?.iter().sum())
        };
        let nonzero =
            |map: &PerCpuArray<MapData, u64>, n: u32| -> Result<Vec<(u32, u64)>, MapError> {
                let mut out = Vec::new();
                for i in 0..n {
                    let v = sum(map, i)?;
                    if v > 0 {
                        out.push((i, v));
                    }
                }
                Ok(out)
            };
        Ok(KernelCounts {
            established: (
                sum(&self.counts, counts::ESTABLISHED_CLIENT)?,
                sum(&self.counts, counts::ESTABLISHED_SERVER)?,
            ),
            closed_quiet: sum(&self.counts, counts::CLOSED_QUIET)?,
            flushed: sum(&self.counts, counts::FLUSHED)?,
            conns_full: sum(&self.counts, counts::CONNS_FULL)?,
            latency: nonzero(&self.latency, LATENCY_BUCKETS)?,
            normal_drops: if sum(&self.counts, counts::NORMAL_DROPS)? == 0 {
                Vec::new()
            } else {
                nonzero(&self.normal_drops, NORMAL_DROP_SLOTS)?
            },
        })
    }

    /// Every connection the kernel follows now, by socket address, into `out` (cleared
    /// first): `BATCH` entries per system call. Entries come and go meanwhile; each is read
    /// as it was when its batch was copied.
    pub fn snapshot(&mut self, out: &mut Vec<(u64, History)>) -> Result<(), BatchError> {
        out.clear();
        let fd = self.conns.map().fd().as_fd().as_raw_fd();
        // The hash map's batch position is a bucket index (u32); 8 bytes leave room.
        let (mut token_in, mut token_out) = (0u64, 0u64);
        let mut first = true;
        loop {
            let mut attr = BatchAttr {
                in_batch: if first {
                    0
                } else {
                    (&raw const token_in) as u64
                },
                out_batch: (&raw mut token_out) as u64,
                keys: self.keys.as_mut_ptr() as u64,
                values: self.values.as_mut_ptr() as u64,
                count: BATCH as u32,
                map_fd: fd as u32,
                ..BatchAttr::default()
            };
            // SAFETY: bpf(2) with a `union bpf_attr` prefix of the size given; the key and
            // value buffers hold `count` entries of the map's key and value sizes.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &raw mut attr,
                    size_of::<BatchAttr>(),
                )
            };
            let err = (rc < 0).then(std::io::Error::last_os_error);
            let n = (attr.count as usize).min(BATCH);
            out.extend(
                self.keys[..n]
                    .iter()
                    .copied()
                    .zip(self.values[..n].iter().copied()),
            );
            match err {
                None => {}
                // ENOENT: no entry past this batch.
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Some(e) => return Err(BatchError::Lookup(e)),
            }
            token_in = token_out;
            first = false;
        }
    }

    /// Asks the kernel to report connection `sk` (started at `started_ns`) from now on, as
    /// it would a failing one: its close, and everything that promotes it.
    pub fn watch(&mut self, sk: u64, started_ns: u64) -> Result<(), MapError> {
        self.watch.insert(sk, started_ns, 0)?;
        if !self.watched {
            self.watching.set(watching::SOCKETS, 1, 0)?;
            self.watched = true;
        }
        Ok(())
    }

    /// Asks the kernel to send the history of a listener's child with tuple `t` (the server's
    /// end first) as it starts (`follow`), or no longer (`!follow`): a handshake userspace
    /// follows as an attempt, whose completion it must see. Attempts of two namespaces may
    /// share a tuple: the tuple is watched while either is open.
    pub fn watch_tuple(&mut self, t: Tuple, follow: bool) -> Result<(), MapError> {
        let n = self.tuples.get(&t).copied().unwrap_or(0);
        if follow {
            if n == 0
                && let Err(error) = self.watch_tuples.insert(t, 1, 0)
            {
                self.tuple_failures += 1;
                return Err(error);
            }
            self.tuples.insert(t, n + 1);
        } else if n == 1 {
            self.tuples.remove(&t);
            if let Err(error) = self.watch_tuples.remove(&t) {
                debug!(%error, "WATCH_TUPLES: the tuple was not there");
            }
        } else if n > 1 {
            self.tuples.insert(t, n - 1);
        }
        let watched = u32::try_from(self.tuples.len()).unwrap_or(u32::MAX);
        self.watching.set(watching::TUPLES, watched, 0)
    }

    /// Once every tuple the kernel added to `WATCH_TUPLES` (a cookie's) has gone with its
    /// attempt, the kernel's flag is cleared, so that listeners' children stop looking the
    /// map up. Cleared first and set again when a tuple not userspace's own is there: a
    /// cookie the kernel adds meanwhile sets it itself, after its insert.
    pub fn settle_kernel_tuples(&mut self) -> Result<(), MapError> {
        if self.watching.get(&watching::KERNEL_TUPLES, 0)? == 0 {
            return Ok(());
        }
        self.watching.set(watching::KERNEL_TUPLES, 0, 0)?;
        let mut foreign = false;
        for key in self.watch_tuples.keys() {
            if !self.tuples.contains_key(&key?) {
                foreign = true;
                break;
            }
        }
        if foreign {
            self.watching.set(watching::KERNEL_TUPLES, 1, 0)?;
        }
        Ok(())
    }

    /// Tuples `WATCH_TUPLES` could not take (full under a flood of attempts).
    pub fn tuple_watch_failures(&self) -> u64 {
        self.tuple_failures
    }
}

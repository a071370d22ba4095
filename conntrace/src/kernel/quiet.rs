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

use super::{LoadError, attempt_tuples::AttemptTuples, conn_slots::ConnSlots, take_map};

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
    /// Handshake attempts whose tuple found `WATCH_TUPLES` full (followed by streaming every
    /// listener's child while any such attempt was open).
    pub tuples_full: u64,
    /// Connections userspace found stuck that found `WATCH` full.
    pub watch_full: u64,
    /// Connections whose close the kernel skipped, dropped from `CONNS` by [`QuietMaps::forget`].
    pub closes_unseen: u64,
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
    slots: ConnSlots,
    conns: HashMap<MapData, u64, History>,
    watch: HashMap<MapData, u64, u64>,
    watching: Array<MapData, u32>,
    /// Whether `watching` was set.
    watched: bool,
    /// Inserts `WATCH` had no room for.
    watch_failures: u64,
    /// Entries [`Self::forget`] dropped.
    forgotten: u64,
    watch_tuples: HashMap<MapData, Tuple, u8>,
    /// The open attempts' tuples, in `watch_tuples` or waiting for room.
    tuples: AttemptTuples,
    /// What `watching::TUPLES_FULL` says now.
    full: bool,
    counts: PerCpuArray<MapData, u64>,
    latency: PerCpuArray<MapData, u64>,
    normal_drops: PerCpuArray<MapData, u64>,
    keys: Vec<u64>,
    values: Vec<History>,
}

impl QuietMaps {
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, LoadError> {
        let slots = ebpf
            .take_map(names::CONN_SLOTS)
            .ok_or(LoadError::MissingMap(names::CONN_SLOTS))?;
        Ok(Self {
            slots: ConnSlots::new(slots).map_err(LoadError::ConnSlots)?,
            conns: take_map(ebpf, names::CONNS)?,
            watch: take_map(ebpf, names::WATCH)?,
            watching: take_map(ebpf, names::WATCHING)?,
            watched: false,
            watch_failures: 0,
            forgotten: 0,
            watch_tuples: take_map(ebpf, names::WATCH_TUPLES)?,
            tuples: AttemptTuples::default(),
            full: false,
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
            tuples_full: self.tuples.failures(),
            watch_full: self.watch_failures,
            closes_unseen: self.forgotten,
            latency: nonzero(&self.latency, LATENCY_BUCKETS)?,
            normal_drops: if sum(&self.counts, counts::NORMAL_DROPS)? == 0 {
                Vec::new()
            } else {
                nonzero(&self.normal_drops, NORMAL_DROP_SLOTS)?
            },
        })
    }

    /// Every connection the kernel follows now, by socket address, into `out` (cleared
    /// first): those in `CONN_SLOTS` read in place, those in `CONNS` `BATCH` entries per
    /// system call. Entries come and go meanwhile; each is read as it was when it was
    /// copied.
    pub fn snapshot(&mut self, out: &mut Vec<(u64, History)>) -> Result<(), BatchError> {
        out.clear();
        self.slots.snapshot(out);
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
            // SAFETY: the `batch` member of `union bpf_attr`; the key and value buffers hold
            // `count` entries of the map's key and value sizes.
            let err = unsafe { super::sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
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
    /// it would a failing one: its close, and everything that promotes it. Errors: the
    /// insert (no room: counted, [`Self::watch_failures`]) or the `WATCHING` update.
    pub fn watch(&mut self, sk: u64, started_ns: u64) -> Result<(), MapError> {
        if let Err(e) = self.watch.insert(sk, started_ns, 0) {
            self.watch_failures += 1;
            return Err(e);
        }
        if !self.watched {
            self.watching.set(watching::SOCKETS, 1, 0)?;
            self.watched = true;
        }
        Ok(())
    }

    /// Drops the kernel's entries of connection `sk` started at `started_ns` (if its address
    /// holds no newer one): a connection whose close the kernel skipped, which would otherwise
    /// hold its place in `CONN_SLOTS` or `CONNS` (and `WATCH`) until its address was reused.
    /// True when it was there. Errors: the lookup or the deletion (`bpf_map_*_elem`).
    pub fn forget(&mut self, sk: u64, started_ns: u64) -> Result<bool, MapError> {
        if !self.slots.forget(sk, started_ns) {
            match self.conns.get(&sk, 0) {
                Ok(h) if h.started_ns == started_ns => {}
                Ok(_) | Err(MapError::KeyNotFound) => return Ok(false),
                Err(e) => return Err(e),
            }
            match self.conns.remove(&sk) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
        }
        if self.watched {
            match self.watch.remove(&sk) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
        }
        self.forgotten += 1;
        Ok(true)
    }

    /// Connections `WATCH` had no room for so far.
    pub fn watch_failures(&self) -> u64 {
        self.watch_failures
    }

    /// Asks the kernel to send the history of a listener's child with tuple `t` (the server's
    /// end first) as it starts (`follow`), or no longer (`!follow`): a handshake userspace
    /// follows as an attempt, whose completion it must see. Attempts of two namespaces may
    /// share a tuple: the tuple is watched while either is open. A tuple `WATCH_TUPLES` has
    /// no room for (a flood of attempts) is followed by setting `watching::TUPLES_FULL` at
    /// once, under which every listener's child streams, and put in the map when a tuple
    /// leaves it ([`Self::settle_tuples`]). Errors: the `WATCHING` update (`bpf_map_update_elem`).
    pub fn watch_tuple(&mut self, t: Tuple, follow: bool) -> Result<(), MapError> {
        let map = &mut self.watch_tuples;
        if follow {
            let placed = self.tuples.follow(t, |t| match map.insert(t, 1, 0) {
                Ok(()) => true,
                Err(error) => {
                    debug!(%error, "WATCH_TUPLES: no room for the tuple; every listener's child streams");
                    false
                }
            });
            if !placed {
                return self.set_full(true);
            }
        } else {
            self.tuples.unfollow(t, |t| {
                if let Err(error) = map.remove(t) {
                    debug!(%error, "WATCH_TUPLES: the tuple was not there");
                }
            });
        }
        self.set_tuple_count()
    }

    /// Each tick: puts tuples that found `WATCH_TUPLES` full in it once tuples have left it,
    /// and clears `watching::TUPLES_FULL` once every open attempt's tuple is there (the map
    /// first, the flag after). Errors: the `WATCHING` update (`bpf_map_update_elem`).
    pub fn settle_tuples(&mut self) -> Result<(), MapError> {
        let map = &mut self.watch_tuples;
        if self.tuples.retry(|t| map.insert(t, 1, 0).is_ok()) {
            self.set_tuple_count()?;
        }
        self.set_full(self.tuples.short_of_room())
    }

    /// Writes how many tuples `WATCH_TUPLES` holds to `watching::TUPLES`.
    fn set_tuple_count(&mut self) -> Result<(), MapError> {
        let watched = u32::try_from(self.tuples.placed()).unwrap_or(u32::MAX);
        self.watching.set(watching::TUPLES, watched, 0)
    }

    /// Writes `watching::TUPLES_FULL` when it changes.
    fn set_full(&mut self, full: bool) -> Result<(), MapError> {
        if full != self.full {
            self.watching
                .set(watching::TUPLES_FULL, u32::from(full), 0)?;
            self.full = full;
        }
        Ok(())
    }

    /// Tuples `WATCH_TUPLES` could not take (full under a flood of attempts).
    pub fn tuple_watch_failures(&self) -> u64 {
        self.tuples.failures()
    }
}

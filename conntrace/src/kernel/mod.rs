//! Loading the embedded eBPF object, configuring it for the running kernel and attaching it.

pub mod accept_queues;
pub mod attach;
mod attempt_tuples;
pub mod btf;
mod cgroup;
mod conn_slots;
pub mod decode;
mod hooks;
pub mod kallsyms;
pub mod layout;
pub mod nfhook;
pub mod packet_gate;
pub mod quiet;
pub mod stats;

use std::{collections::BTreeMap, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
};
use conntrace_common::{
    Config, FLAG_ALL_PORTS, FLAG_QUIET, INLINE_PORTS, MAX_PORTS, NO_STACK_REASON, TracepointLayout,
    globals, maps, programs,
};

use serde::Serialize;
use tracing::{debug, warn};

use crate::engine::facts::DropReason;

use self::{
    accept_queues::AcceptQueues, attach::Capability, btf::KernelBtf, layout::LayoutError,
    packet_gate::PacketGate,
};

/// The eBPF object built from `conntrace-ebpf` by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/conntrace"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error("cannot parse kernel release `{0}`")]
    KernelRelease(String),
    #[error("load the eBPF object (bpf(BPF_MAP_CREATE)): {0}")]
    Object(#[source] aya::EbpfError),
    #[error("map `{0}` is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map `{name}` (bpf(BPF_MAP_*)): {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    ConnSlots(#[from] conn_slots::SlotsError),
    #[error("too many ports: at most {MAX_PORTS} can be filtered in the kernel")]
    TooManyPorts,
    #[error("capability `{capability}` is required but no program could attach: {cause}")]
    Required {
        capability: Capability,
        #[source]
        cause: hooks::Unattached,
    },
}

/// Why a capability is not attached when the operator left it out.
const WITHOUT_REASON: &str = "left out with --without";

/// A program that is attached, for the `ready` line.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct ActiveProgram {
    pub capability: Capability,
    pub name: &'static str,
    pub attach: String,
    /// Instructions the verifier walked to accept it (`bpf_prog_info.verified_insns`, Linux
    /// 5.16+; absent before), against its limit of 1,000,000: how close the program is to
    /// being refused on this kernel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified_insns: Option<u32>,
}

/// A rule that was tried and did not attach, with the kernel's reason.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Unavailable {
    pub capability: Capability,
    pub name: &'static str,
    pub attach: String,
    pub reason: String,
}

pub struct TracerOptions {
    /// Ports to trace; empty means every port.
    pub ports: Vec<u16>,
    pub ring_bytes: u32,
    /// Capabilities the operator left out (`--without`).
    pub without: Vec<Capability>,
    /// Which kinds of hook may be used (`--attach`).
    pub mode: attach::AttachMode,
    /// Whether healthy connections stay in the kernel.
    pub follow: attach::Follow,
    /// `--stall-timeout` (0: off): a quiet connection established this long without data or
    /// accept() reports its close.
    pub stall_timeout: std::time::Duration,
    /// `--show-normal-drops`: normal drops are sent, not counted in the kernel.
    pub show_normal_drops: bool,
}

/// Everything attached and the maps userspace reads.
pub struct Tracer {
    /// Keeps programs and links alive: dropping it detaches everything.
    ebpf: Ebpf,
    /// The per-packet SYN-cookie program's link, when that program is the one attached
    /// (`packet_gate`); dropped with the tracer like the others.
    cookie_gate: Option<PacketGate>,
    /// Whether that link follows the listeners (`--port` given); otherwise it stays.
    cookies_gated: bool,
    lost: PerCpuArray<MapData, u64>,
    read_failures: PerCpuArray<MapData, u64>,
    pub kernel_release: String,
    pub active: Vec<ActiveProgram>,
    pub unavailable: Vec<Unavailable>,
    /// Capabilities served by another capability's program, with its attach point
    /// (`connect_denied` where `fexit:inet_stream_connect` reads `connect()`'s result).
    pub shared: Vec<(Capability, String)>,
    /// `enum sk_rst_reason` names of this kernel (empty before 6.10).
    pub reset_reasons: BTreeMap<u32, String>,
    /// `enum skb_drop_reason` names of this kernel (their numbers differ between kernels).
    pub drop_reasons: BTreeMap<u32, DropReason>,
    pub missing_offsets: Vec<&'static str>,
    /// Whether `tcp:tcp_send_reset` also fires for resets sent without a socket: from 6.10,
    /// the release that gave it its `reason` field.
    pub socketless_resets_traced: bool,
    /// The accept-queue iterator, loaded but run only on demand; `None` when this kernel
    /// refused it or `--without accept-queues` (then listed in `unavailable`).
    pub accept_queues: Option<AcceptQueues>,
    /// Quiet mode's maps (`None` when connections stream).
    pub quiet: Option<quiet::QuietMaps>,
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Raises RLIMIT_MEMLOCK for kernels that still charge BPF memory against it (< 5.11).
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid pointer to a local struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        debug!(
            "setrlimit(RLIMIT_MEMLOCK) failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn optional_layout(root: &Path, category: &str, name: &str) -> Result<TracepointLayout, LoadError> {
    match layout::read_format(root, category, name) {
        Ok(fields) => Ok(layout::tracepoint_layout(&fields)),
        Err(LayoutError::NoTracepoint { .. }) => Ok(TracepointLayout::NONE),
        Err(e) => Err(e.into()),
    }
}

impl Tracer {
    /// Loads, configures and attaches everything; returns the tracer and its event ring buffer.
    pub fn start(opts: &TracerOptions) -> Result<(Self, RingBuf<MapData>), LoadError> {
        if opts.ports.len() > MAX_PORTS as usize {
            return Err(LoadError::TooManyPorts);
        }
        let release = kernel_release();
        let version = attach::kernel_version(&release)
            .ok_or_else(|| LoadError::KernelRelease(release.clone()))?;
        let root = layout::tracefs_root()?;
        let btf = KernelBtf::load(Path::new(btf::VMLINUX_BTF))?;
        let offsets = btf.kernel_offsets();
        let missing_offsets = btf::missing_offsets(&offsets);
        if !missing_offsets.is_empty() {
            warn!(
                ?missing_offsets,
                "kernel structures not found in BTF: network namespace or process attribution degraded"
            );
        }
        let drop_reasons: BTreeMap<u32, DropReason> = btf
            .enum_names("skb_drop_reason", "SKB_DROP_REASON_")
            .into_iter()
            .map(|(value, name)| (value, DropReason::new(&name)))
            .collect();
        let reset_reasons = btf.enum_names("sk_rst_reason", "SK_RST_REASON_");
        let flows = btf.flow_offsets();
        let mut refused: Vec<(&str, &str)> = Vec::new();
        if !btf.sock_common_as_compiled() {
            refused.push((
                "tp_btf_inet_sock_set_state",
                "struct sock_common is laid out differently from what the program loads directly",
            ));
        }
        if offsets.skb_sk != conntrace_common::sk_buff::SK as u32 {
            for program in ["tp_btf_net_dev_queue", "tp_btf_kfree_skb"] {
                refused.push((
                    program,
                    "struct sk_buff's sk is not where the program loads it directly",
                ));
            }
        }
        if btf.tracepoint_args("kfree_skb") != Some(4) {
            refused.push((
                "tp_btf_kfree_skb",
                "kfree_skb passes no rx_sk to BTF-typed programs before 6.11",
            ));
        }
        if !flows.flow4.complete() {
            refused.push((
                "tp_btf_fib_table_lookup",
                "BTF does not describe the struct flowi4 members the program reads",
            ));
        }
        if !flows.flow6.complete() || flows.fib6_type == conntrace_common::KernelOffsets::MISSING {
            refused.push((
                "tp_btf_fib6_table_lookup",
                "BTF does not describe the struct flowi6 and fib6_result members the program reads",
            ));
        }
        // Everything needed from the parsed BTF is taken: free it before the loader parses
        // the kernel's BTF again, so the two never sit in memory together (peak RSS).
        drop(btf);
        let stack_drop_reason = drop_reasons
            .iter()
            .find(|(_, name)| **name == DropReason::NETFILTER_DROP)
            .map_or(NO_STACK_REASON, |(&value, _)| value);
        let set_state =
            layout::tracepoint_layout(&layout::read_format(&root, "sock", "inet_sock_set_state")?);
        let config = Config {
            set_state,
            error_report: optional_layout(&root, "sock", "inet_sk_error_report")?,
            receive_reset: optional_layout(&root, "tcp", "tcp_receive_reset")?,
            send_reset: optional_layout(&root, "tcp", "tcp_send_reset")?,
            retransmit: optional_layout(&root, "tcp", "tcp_retransmit_skb")?,
            kfree_skb: optional_layout(&root, "skb", "kfree_skb")?,
            data_ready: optional_layout(&root, "sock", "sk_data_ready")?,
            send_length: optional_layout(&root, "sock", "sock_send_length")?,
            dev_queue: optional_layout(&root, "net", "net_dev_queue")?,
            syscalls: layout::syscall_layout(&root)?,
            fib: layout::optional_fib_layout(&root, "fib", "fib_table_lookup")?,
            fib6: layout::optional_fib_layout(&root, "fib6", "fib6_table_lookup")?,
            flow4: flows.flow4,
            flow6: flows.flow6,
            fib6_type: flows.fib6_type,
            fib6_table_id: flows.fib6_table_id,
            offsets,
            flags: if opts.ports.is_empty() {
                FLAG_ALL_PORTS
            } else {
                0
            } | if opts.follow == attach::Follow::Quiet {
                FLAG_QUIET
            } else {
                0
            },
            stack_drop_reason,
            wakeup_bytes: opts.ring_bytes / 4,
            stall_timeout_ms: u32::try_from(opts.stall_timeout.as_millis()).unwrap_or(u32::MAX),
            normal_drops: normal_drop_values(&drop_reasons, opts.show_normal_drops),
            inline_ports: inline_ports(&opts.ports),
            inline_port_count: if opts.ports.len() <= INLINE_PORTS {
                opts.ports.len() as u32
            } else {
                u32::MAX
            },
            _pad: 0,
        };

        raise_memlock();
        // One parse of the kernel's BTF serves the loader's relocations and the fentry/fexit
        // programs' targets; it is dropped once everything is attached.
        let kernel_btf = aya::Btf::from_sys_fs().ok();
        let mut ebpf = EbpfLoader::new()
            .btf(kernel_btf.as_ref())
            // A refused program's log then holds the verifier's message and counts, not a
            // trace of every instruction it walked (truncated before the message, for one
            // refused at its 1M-instruction limit).
            .verifier_log_level(aya::VerifierLogLevel::STATS)
            .map_max_entries(maps::EVENTS, opts.ring_bytes)
            // Read-only: the verifier sees these as constants (direct loads, `sock.rs`).
            .override_global(globals::OFFSETS, &config.offsets, true)
            .load(EBPF_OBJECT)
            .map_err(LoadError::Object)?;
        write_config(&mut ebpf, &config, &opts.ports)?;

        let hooks::Attached {
            mut active,
            mut unavailable,
            shared,
            gate: cookie_gate,
        } = hooks::attach_all(&mut ebpf, version, opts, kernel_btf.as_ref(), &refused)?;
        let accept_queues = match load_accept_queues(&mut ebpf, opts, kernel_btf.as_ref()) {
            Ok(queues) => {
                active.push(ActiveProgram {
                    capability: Capability::AcceptQueues,
                    name: accept_queues::PROGRAM,
                    attach: accept_queues::ATTACH.to_owned(),
                    verified_insns: hooks::verified_insns(&ebpf, accept_queues::PROGRAM),
                });
                Some(queues)
            }
            Err(reason) => {
                unavailable.push(Unavailable {
                    capability: Capability::AcceptQueues,
                    name: accept_queues::PROGRAM,
                    attach: accept_queues::ATTACH.to_owned(),
                    reason,
                });
                None
            }
        };
        drop(kernel_btf);
        let events: RingBuf<MapData> = take_map(&mut ebpf, maps::EVENTS)?;
        let lost: PerCpuArray<MapData, u64> = take_map(&mut ebpf, maps::LOST)?;
        let read_failures = take_map(&mut ebpf, maps::READ_FAILURES)?;
        let quiet = if opts.follow == attach::Follow::Quiet {
            Some(quiet::QuietMaps::take(&mut ebpf)?)
        } else {
            None
        };
        let tracer = Self {
            ebpf,
            // Every port traced: some listener always is, and the program stays attached.
            cookies_gated: cookie_gate.is_some() && !opts.ports.is_empty(),
            cookie_gate,
            lost,
            read_failures,
            kernel_release: release,
            active,
            unavailable,
            shared,
            reset_reasons,
            drop_reasons,
            missing_offsets,
            socketless_resets_traced: config.send_reset.reason != conntrace_common::ABSENT,
            accept_queues,
            quiet,
        };
        Ok((tracer, events))
    }

    /// Kernel reads that failed, by program (summed over CPUs); programs without any are left
    /// out.
    pub fn read_failures(&self) -> Result<BTreeMap<&'static str, u64>, aya::maps::MapError> {
        let mut failures = BTreeMap::new();
        for (index, name) in (0..).zip(programs::NAMES) {
            let n: u64 = self.read_failures.get(&index, 0)?.iter().sum();
            if n > 0 {
                failures.insert(name, n);
            }
        }
        Ok(failures)
    }

    /// Whether the per-packet SYN-cookie program is attached; `None` when it is not gated
    /// (fentry on the cookie functions, every port traced, or `--without syn-cookies`).
    pub fn cookie_program_attached(&self) -> Option<bool> {
        let gate = self.cookie_gate.as_ref().filter(|_| self.cookies_gated)?;
        Some(gate.attached())
    }

    /// Attaches (`on`) or detaches the per-packet SYN-cookie program; nothing when it is not
    /// gated or already so. Logs the change.
    pub fn set_cookie_program(&mut self, on: bool) -> Result<(), hooks::AttachError> {
        let Some(gate) = self.cookie_gate.as_mut().filter(|_| self.cookies_gated) else {
            return Ok(());
        };
        if gate.attached() == on {
            return Ok(());
        }
        gate.set(&mut self.ebpf, on)?;
        debug!(
            program = gate.program(),
            attached = on,
            "per-packet SYN-cookie program"
        );
        Ok(())
    }

    /// Events the kernel side could not write into the ring buffer, summed over CPUs.
    pub fn lost_events(&self) -> Result<u64, aya::maps::MapError> {
        Ok(self.lost.get(&maps::LOST_COUNT, 0)?.iter().sum())
    }

    /// The most bytes seen waiting in the ring buffer since the last call (the fullest CPU's
    /// view after its writes), and resets it.
    pub fn take_ring_peak(&mut self) -> Result<u64, aya::maps::MapError> {
        let peaks = self.lost.get(&maps::RING_PEAK, 0)?;
        let peak = peaks.iter().copied().max().unwrap_or(0);
        let zeros = aya::maps::PerCpuValues::try_from(vec![0u64; peaks.len()])
            .map_err(aya::maps::MapError::from)?;
        self.lost.set(maps::RING_PEAK, zeros, 0)?;
        Ok(peak)
    }
}

/// Loads the on-demand accept-queue iterator unless `--without accept-queues`; otherwise the
/// reason it is not there, for `unavailable`. A kernel that refuses it (no `iter/tcp` before
/// 5.9, a verifier that rejects the walk) costs only the listener that holds a queued
/// connection: conntrace runs on.
fn load_accept_queues(
    ebpf: &mut Ebpf,
    opts: &TracerOptions,
    btf: Option<&aya::Btf>,
) -> Result<AcceptQueues, String> {
    if opts.without.contains(&Capability::AcceptQueues) {
        return Err(WITHOUT_REASON.to_owned());
    }
    AcceptQueues::load(ebpf, btf).map_err(|error| {
        debug!(program = accept_queues::PROGRAM, "not loaded: {error}");
        error.summary()
    })
}

/// `Config::inline_ports`: the first [`INLINE_PORTS`] traced ports, zeros after.
fn inline_ports(ports: &[u16]) -> [u16; INLINE_PORTS] {
    let mut inline = [0; INLINE_PORTS];
    for (slot, port) in inline.iter_mut().zip(ports) {
        *slot = *port;
    }
    inline
}

/// `Config::normal_drops`: this kernel's values of the drop reasons that are a normal part of
/// TCP wherever they happen (`engine::rules::drops::NORMAL`); none when they are to be shown.
fn normal_drop_values(reasons: &BTreeMap<u32, DropReason>, show: bool) -> [u32; 4] {
    let mut values = [NO_STACK_REASON; 4];
    if show {
        return values;
    }
    let normal = reasons
        .iter()
        .filter(|(_, name)| crate::engine::NORMAL_DROP_REASONS.contains(&name.as_str()))
        .map(|(&value, _)| value);
    for (slot, value) in values.iter_mut().zip(normal) {
        *slot = value;
    }
    values
}

/// Wraps a map error with the map's name.
fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> LoadError {
    move |source| LoadError::Map { name, source }
}

/// Takes map `name` out of the object, typed.
fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    T::try_from(map).map_err(map_error(name))
}

fn write_config(ebpf: &mut Ebpf, config: &Config, ports: &[u16]) -> Result<(), LoadError> {
    let map = ebpf
        .map_mut(maps::CONFIG)
        .ok_or(LoadError::MissingMap(maps::CONFIG))?;
    let mut array: Array<_, Config> = Array::try_from(map).map_err(map_error(maps::CONFIG))?;
    array.set(0, config, 0).map_err(map_error(maps::CONFIG))?;
    let map = ebpf
        .map_mut(maps::PORTS)
        .ok_or(LoadError::MissingMap(maps::PORTS))?;
    let mut hash: HashMap<_, u16, u8> = HashMap::try_from(map).map_err(map_error(maps::PORTS))?;
    for port in ports {
        hash.insert(port, 1, 0).map_err(map_error(maps::PORTS))?;
    }
    Ok(())
}

/// `bpf(cmd, attr, size_of::<T>())`: the commands aya has no call for. Errors: the system
/// call's errno.
///
/// # Safety
/// `attr` is the prefix of `union bpf_attr` that `cmd` reads, and every buffer it points to
/// is valid for what the kernel writes there.
unsafe fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<()> {
    // SAFETY: the caller's contract.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

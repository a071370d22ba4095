//! The event loop: ring buffer → decoder → (namespace filter) → reason engine → (container
//! identity) → output, until the end of the run.

mod identity;
mod listening;
mod quiet;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};
use tracing::{debug, warn};

use crate::{
    cli::Cli,
    engine::{Engine, EngineConfig, facts::KernelEvent, verdict::Verdict},
    host::{
        containers::{self, Identities},
        counters::OverflowWatch,
        listeners::ListenerCache,
        namespaces::NamespaceCache,
        owners::StartOwners,
        rules::RuleCounters,
        stalls::StallCheck,
        windows::WindowWatch,
    },
    kernel::{
        LoadError, Tracer, TracerOptions,
        attach::Capability,
        decode::Decoder,
        kallsyms::Kallsyms,
        stats::{RunTimeStats, StatsError},
    },
    output::metrics::{self, Metrics},
    output::{Clock, Final, Format, KernelFeatures, Lost, Output, OutputError, Ready, Record},
};

use self::{
    identity::Identity,
    listening::ListenerWatch,
    quiet::{bring_in, check_stalls, settle_attempt_tuples, watch_attempts},
};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error("watch the ring buffer (epoll): {0}")]
    Poll(#[source] std::io::Error),
    #[error("install signal handler (sigaction): {0}")]
    Signal(#[source] std::io::Error),
    #[error(transparent)]
    Metrics(#[from] crate::output::metrics::MetricsError),
    #[error(transparent)]
    Stats(#[from] StatsError),
}

fn kernel_features() -> KernelFeatures {
    KernelFeatures {
        btf: std::path::Path::new(crate::kernel::btf::VMLINUX_BTF).exists(),
    }
}

/// Docker-compatible sockets tried when none is given: Docker's, then Podman's service.
const DOCKER_SOCKETS: &[&str] = &["/var/run/docker.sock", "/run/podman/podman.sock"];
/// containerd sockets tried when none is given: containerd's, then k3s's.
const CONTAINERD_SOCKETS: &[&str] = &[
    "/run/containerd/containerd.sock",
    "/run/k3s/containerd/containerd.sock",
];
/// Bound on each call to a runtime's API.
const API_TIMEOUT: Duration = Duration::from_secs(1);

/// The container look-ups, unless `--no-containers`; a worker that cannot start leaves every
/// `container` null (and `--container`/`--pod` selecting nothing).
fn identities(cli: &Cli) -> Option<Identities> {
    if cli.no_containers {
        return None;
    }
    let or_default = |given: &[std::path::PathBuf], default: &[&str]| {
        if given.is_empty() {
            default.iter().map(Into::into).collect()
        } else {
            given.to_vec()
        }
    };
    let select =
        (!cli.containers.is_empty() || !cli.pods.is_empty()).then(|| containers::Selector {
            containers: cli.containers.clone(),
            pods: cli.pods.clone(),
        });
    check_sockets("--docker-socket", &cli.docker_sockets);
    check_sockets("--containerd-socket", &cli.containerd_sockets);
    let options = containers::Options {
        docker_sockets: or_default(&cli.docker_sockets, DOCKER_SOCKETS),
        containerd_sockets: or_default(&cli.containerd_sockets, CONTAINERD_SOCKETS),
        api_timeout: API_TIMEOUT,
        warn_on_failure: !cli.docker_sockets.is_empty() || !cli.containerd_sockets.is_empty(),
        select,
    };
    Identities::start(options)
        .inspect_err(
            |error| warn!(%error, "start the container look-up thread: containers unnamed"),
        )
        .ok()
}

/// Warns at start-up about each runtime socket given on the command line that is missing or
/// is no socket (`stat(2)`): its containers would stay unnamed without a word until one
/// appeared. Not fatal: a runtime may start after conntrace.
fn check_sockets(flag: &str, paths: &[std::path::PathBuf]) {
    use std::os::unix::fs::FileTypeExt;
    for path in paths {
        match std::fs::metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {}
            Ok(_) => warn!(
                path = %path.display(),
                "{flag}: not a socket; containers it runs stay unnamed"
            ),
            Err(error) => warn!(
                path = %path.display(),
                %error,
                "{flag}: cannot use it (stat); containers it runs stay unnamed until it appears"
            ),
        }
    }
}

/// With `--container`/`--pod`: waits (3 s at most) for the first look at every namespace, and
/// warns when no selected container runs yet (its namespace is admitted when it appears).
async fn await_selection(cli: &Cli, ident: &Identity) {
    let Some(ids) = ident.identities() else {
        return;
    };
    if cli.containers.is_empty() && cli.pods.is_empty() {
        return;
    }
    if !ids.first_pass(Duration::from_secs(3)).await {
        warn!(
            "container look-up still running: selected namespaces are admitted as they are found"
        );
    } else if ids.selected_netns().is_empty() {
        warn!(containers = ?cli.containers, pods = ?cli.pods, "no selected container runs yet: nothing is traced until one starts");
    } else {
        debug!(netns = ?ids.selected_netns(), "traced namespaces");
    }
}

/// The output (opened first: a bad path fails before anything is loaded into the kernel) and
/// the metrics, their address bound before anything is loaded too.
fn open_output(cli: &Cli) -> Result<(Output, Option<Arc<Metrics>>), RunError> {
    let format = if cli.json {
        Format::Json
    } else {
        Format::Human { wide: cli.wide }
    };
    let node = cli.node.as_deref().filter(|n| !n.is_empty());
    let mut out = Output::open(cli.output.as_deref(), format, Clock::now())?.with_node(node);
    let metrics = match cli.metrics_addr {
        Some(addr) => {
            let listener = metrics::bind(addr)?;
            let m = Arc::new(Metrics::new(
                cli.ring_buffer_bytes,
                cli.metrics_container_labels,
                node,
            ));
            metrics::spawn(listener, Arc::clone(&m))?;
            out = out.with_metrics(Arc::clone(&m));
            Some(m)
        }
        None => None,
    };
    Ok((out, metrics))
}

/// The `ready` record: what is traced, and how.
fn ready_record(cli: &Cli, tracer: &Tracer, ports: Vec<u16>) -> Ready {
    let attached = tracer.active.iter().map(|p| (p.capability, &p.attach));
    let shared = tracer.shared.iter().map(|(c, attach)| (*c, attach));
    let attach_paths: BTreeMap<String, String> = attached
        .chain(shared)
        .map(|(capability, attach)| {
            let cap = serde_json::to_value(capability)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            (cap, attach.split(':').next().unwrap_or_default().to_owned())
        })
        .collect();
    Ready {
        ts_ns: Clock::mono_now_ns(),
        version: env!("CARGO_PKG_VERSION"),
        ports,
        follow: cli.follow(),
        programs: tracer.active.clone(),
        unavailable: tracer.unavailable.clone(),
        kernel: tracer.kernel_release.clone(),
        attach_paths,
        kernel_features: kernel_features(),
        ring_buffer_bytes: cli.ring_buffer_bytes,
        degraded: tracer.missing_offsets.clone(),
    }
}

/// The reason engine with the host's look-ups. The firewall's rule counters are read now,
/// before any traffic is traced: the baseline later netfilter drops are measured against.
fn engine_for(cli: &Cli, tracer: &mut Tracer) -> Engine {
    let rules = tracer
        .active
        .iter()
        .any(|p| p.capability == Capability::Drops)
        .then(RuleCounters::new);
    let mut engine = Engine::new(EngineConfig {
        report_established: cli.all,
        expected_comms: cli.expect_comm.clone(),
        stall_timeout_ns: cli.stall_timeout.as_nanos() as u64,
        resets_observed: tracer
            .active
            .iter()
            .any(|p| p.capability == Capability::Resets),
        socketless_resets_traced: tracer.socketless_resets_traced,
        show_normal_drops: cli.show_normal_drops,
        quiet: tracer.quiet.is_some(),
        first_data_traced: tracer
            .active
            .iter()
            .any(|p| p.capability == Capability::FirstData),
        ports: cli.ports.clone(),
        ..EngineConfig::default()
    })
    .with_listener_lookup(Box::new(
        ListenerCache::new(tracer.accept_queues.take())
            .with_start_owners(StartOwners::spawn(cli.ports.clone())),
    ))
    .with_namespace_lookup(Box::new(NamespaceCache::default()));
    if let Some(rules) = rules {
        engine = engine.with_rule_lookup(Box::new(rules));
    }
    if tracer.quiet.is_some() {
        engine.log_attempts();
    }
    engine
}

pub async fn run(cli: &Cli) -> Result<(), RunError> {
    let started = Clock::mono_now_ns();
    // Handle SIGINT/SIGTERM from the start: a signal right after `ready` must still end the
    // run with its summary, not kill the process.
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut ports = cli.ports.clone();
    ports.sort_unstable();
    ports.dedup();
    let (mut out, metrics) = open_output(cli)?;
    let mut ident = Identity::new(identities(cli));
    // --bpf-stats: the kernel's run-time statistics, on from before the programs load until
    // this value is dropped at the end of the run (or the process ends, however it ends).
    let bpf_stats = cli.bpf_stats.then(RunTimeStats::enable).transpose()?;
    let (mut tracer, events) = Tracer::start(&TracerOptions {
        ports: ports.clone(),
        ring_bytes: cli.ring_buffer_bytes,
        without: cli.without.clone(),
        mode: cli.attach,
        follow: cli.follow(),
        stall_timeout: cli.stall_timeout,
        show_normal_drops: cli.show_normal_drops,
    })?;
    let ready = ready_record(cli, &tracer, ports.clone());
    let mut engine = engine_for(cli, &mut tracer);
    let mut overflows = OverflowWatch::new(&cli.ports);
    let mut windows = WindowWatch::new(&cli.ports);
    let mut stalls = StallCheck::new(cli.stall_timeout);
    let mut listeners = ListenerWatch::new(&tracer, &ports);
    await_selection(cli, &ident).await;
    out.write(&Record::Ready(&ready))?;

    let kallsyms = Kallsyms::load(std::path::Path::new("/proc/kallsyms")).unwrap_or_else(|e| {
        warn!("read /proc/kallsyms: {e}; drop locations are shown as addresses");
        Kallsyms::default()
    });
    let decoder = Decoder::new(
        tracer.reset_reasons.clone(),
        tracer.drop_reasons.clone(),
        kallsyms,
    );
    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, until it is dropped,
    // which happens only with the AsyncFd.
    let mut ring = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| RunError::Poll(e.into()))?;
    let deadline = tokio::time::sleep(cli.duration.unwrap_or(Duration::from_secs(u64::MAX / 4)));
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    // Streaming: the programs wake userspace only when a quarter of the ring is waiting, so
    // drain often. Quiet: events are rare and each wakes userspace (when it is not already
    // draining): no periodic drain.
    let streaming = tracer.quiet.is_none();
    let mut drain_tick = tokio::time::interval(Duration::from_millis(5));
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut overflow_poll = tokio::time::interval(Duration::from_secs(1));
    let mut window_poll = tokio::time::interval(Duration::from_secs(1));
    let mut ring_peak_poll = tokio::time::interval(Duration::from_secs(1));
    let mut bpf_stats_poll = tokio::time::interval(Duration::from_secs(1));
    let (mut lost_seen, mut decode_errors) = (0u64, 0u64);
    // The loss count the engine was last told of (`note_loss`).
    let mut loss_known = 0u64;
    // Decode errors up to the last tick (lost events and decode errors may hide a listener).
    let mut errors_seen = 0u64;

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(RunError::Poll)?;
                let ring = guard.get_inner_mut();
                note_loss(&tracer, &mut engine, &mut loss_known);
                let verdicts = drain(ring, &decoder, &mut engine, &mut ident, &mut decode_errors, (&mut windows, &mut listeners));
                guard.clear_ready();
                ident.write(&mut out, &mut engine, verdicts)?;
            }
            _ = drain_tick.tick(), if streaming => {
                note_loss(&tracer, &mut engine, &mut loss_known);
                let verdicts = drain(ring.get_mut(), &decoder, &mut engine, &mut ident, &mut decode_errors, (&mut windows, &mut listeners));
                ident.write(&mut out, &mut engine, verdicts)?;
            }
            () = ident.changed() => {
                let verdicts = ident.release().into_iter().flat_map(|ev| engine.handle(ev)).collect();
                ident.write(&mut out, &mut engine, verdicts)?;
            }
            _ = tick.tick() => {
                // A loss counted while the last events were read reaches the connections
                // still waiting for their verdict (a quiet run may read nothing more).
                note_loss(&tracer, &mut engine, &mut loss_known);
                let now = Clock::mono_now_ns();
                let mut verdicts = check_stalls(&mut tracer, &mut stalls, &mut windows, &mut engine, &mut ident, now);
                settle_attempt_tuples(&mut tracer);
                verdicts.extend(engine.tick(now));
                ident.write(&mut out, &mut engine, verdicts)?;
                let lost_before = lost_seen;
                report_lost(&tracer, &mut out, &mut lost_seen)?;
                if lost_seen > lost_before || decode_errors > errors_seen {
                    listeners.events_missed(std::time::Instant::now());
                }
                errors_seen = decode_errors;
                if out.reader_gone() {
                    // A quiet run may write nothing for hours: `| head -1` ends it now.
                    debug!("the reader of stdout is gone");
                    return Err(RunError::Output(OutputError::Closed));
                }
            }
            _ = ring_peak_poll.tick(), if metrics.is_some() => {
                match tracer.take_ring_peak() {
                    Ok(peak) => {
                        if let Some(m) = &metrics {
                            m.set_ring_peak(peak);
                        }
                    }
                    Err(error) => warn!(%error, "read the ring buffer's fill"),
                }
            }
            _ = bpf_stats_poll.tick(), if bpf_stats.is_some() && metrics.is_some() => {
                match tracer.program_costs() {
                    Ok(costs) => {
                        if let Some(m) = &metrics {
                            m.set_program_costs(costs);
                        }
                    }
                    Err(error) => debug!(%error, "read the programs' run-time statistics"),
                }
            }
            _ = overflow_poll.tick() => {
                let mut verdicts = Vec::new();
                for ev in overflows.poll(Clock::mono_now_ns()) {
                    if let Some(ev) = ident.admit(ev) {
                        verdicts.extend(engine.handle(ev));
                    }
                }
                ident.write(&mut out, &mut engine, verdicts)?;
            }
            _ = window_poll.tick() => {
                // Poll, then take what the ring holds: a connection that closed before the
                // dump (and so shows as open) reaches the engine closed first.
                let events = windows.poll(Clock::mono_now_ns());
                note_loss(&tracer, &mut engine, &mut loss_known);
                let mut verdicts = drain(ring.get_mut(), &decoder, &mut engine, &mut ident, &mut decode_errors, (&mut windows, &mut listeners));
                for ev in events {
                    let Some(ev) = ident.admit(ev) else { continue };
                    verdicts.extend(bring_in(&mut tracer, &stalls, &mut engine, &ev));
                    verdicts.extend(engine.handle(ev));
                }
                ident.write(&mut out, &mut engine, verdicts)?;
            }
            _ = sigint.recv() => { debug!("SIGINT"); break }
            _ = sigterm.recv() => { debug!("SIGTERM"); break }
            () = &mut deadline => { debug!("duration elapsed"); break }
        }
        watch_attempts(&mut tracer, &mut engine);
        listeners.apply(&mut tracer, std::time::Instant::now());
    }

    note_loss(&tracer, &mut engine, &mut loss_known);
    let mut verdicts = drain(
        ring.get_mut(),
        &decoder,
        &mut engine,
        &mut ident,
        &mut decode_errors,
        (&mut windows, &mut listeners),
    );
    for ev in overflows.poll(Clock::mono_now_ns()) {
        if let Some(ev) = ident.admit(ev) {
            verdicts.extend(engine.handle(ev));
        }
    }
    if let Some(q) = &tracer.quiet {
        match q.counts() {
            Ok(counts) => add_kernel_counts(&mut engine, &tracer, &counts),
            Err(error) => warn!(%error, "read quiet mode's counts"),
        }
    }
    let open_at_exit = engine.tracked();
    verdicts.extend(engine.finish(Clock::mono_now_ns()));
    ident.write(&mut out, &mut engine, verdicts)?;
    ident.finish(&mut out).await?;
    if ident.filtered > 0 {
        debug!(
            events = ident.filtered,
            "kernel events outside the selected containers"
        );
    }
    report_lost(&tracer, &mut out, &mut lost_seen)?;
    let now = Clock::mono_now_ns();
    let read_failures = tracer.read_failures().unwrap_or_else(|error| {
        warn!(%error, "read the READ_FAILURES map");
        BTreeMap::new()
    });
    let program_misses = tracer.program_misses().unwrap_or_else(|error| {
        warn!(%error, "read the programs' recursion misses");
        BTreeMap::new()
    });
    if let Some(n) = (!program_misses.is_empty()).then(|| program_misses.values().sum::<u64>()) {
        warn!(
            runs = n,
            "the kernel skipped conntrace's programs where they fired while already running on that CPU: those events were missed (summary: program_misses)"
        );
    }
    let programs = bpf_stats.as_ref().and_then(|_| {
        tracer
            .program_costs()
            .inspect_err(|error| warn!(%error, "read the programs' run-time statistics"))
            .ok()
    });
    out.write(&Record::Summary(Final {
        ts_ns: now,
        summary: engine.summary(),
        lost_events: lost_seen,
        decode_errors,
        duration_ms: (now - started) as f64 / 1e6,
        tracked_at_exit: open_at_exit,
        tcp_counters: overflows.growth(),
        read_failures,
        program_misses,
        all_ports: cli.ports.is_empty(),
        programs,
    }))?;
    drop(bpf_stats);
    Ok(())
}

/// What the kernel counted in quiet mode, into the run's summary: handshakes, their times
/// and normal drops.
fn add_kernel_counts(engine: &mut Engine, tracer: &Tracer, c: &crate::kernel::quiet::KernelCounts) {
    let s = engine.summary_mut();
    s.established = c.established;
    s.add_latency_counts(c.latency.iter().copied());
    for (value, n) in &c.normal_drops {
        let reason = tracer.drop_reasons.get(value).cloned().unwrap_or_else(|| {
            crate::engine::facts::DropReason::new(&format!("skb_drop_reason {value}"))
        });
        *s.drops_by_reason.entry(reason).or_default() += n;
    }
    s.kernel_kept = Some(crate::engine::verdict::summary::KernelKept {
        closed_quietly: c.closed_quiet,
        histories: c.flushed,
        table_full: c.conns_full,
        attempt_table_full: c.tuples_full,
        closes_unseen: c.closes_unseen,
        watch_full: c.watch_full,
    });
}

/// Reads every record the ring buffer holds now, after the held events the namespace filter
/// has admitted since, telling `windows` where traced connections are.
fn drain(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    decoder: &Decoder,
    engine: &mut Engine,
    ident: &mut Identity,
    decode_errors: &mut u64,
    (windows, listeners): (&mut WindowWatch, &mut ListenerWatch),
) -> Vec<Verdict> {
    let mut verdicts = Vec::new();
    for ev in ident.release() {
        verdicts.extend(engine.handle(ev));
    }
    while let Some(item) = ring.next() {
        if let Some(ts_ns) = crate::kernel::decode::lost_before(&item) {
            // Events of this CPU were lost just before this one: a loss the counter read
            // before this batch did not show yet.
            engine.events_lost(ts_ns);
        }
        match decoder.decode(&item) {
            Ok(ev) => {
                tracing::trace!(?ev, "kernel event");
                // Before the namespace filter: a listener anywhere may send cookies.
                listeners.observe(&ev, std::time::Instant::now());
                let Some(ev) = ident.admit(ev) else { continue };
                if let KernelEvent::State { meta, .. } = &ev {
                    windows.traced_in(meta.netns);
                }
                verdicts.extend(engine.handle(ev));
            }
            Err(e) => {
                *decode_errors += 1;
                warn!("undecodable kernel event: {e}");
            }
        }
    }
    verdicts
}

/// Tells the engine when the kernel's loss counter grew past what it knew (`known`), before
/// the events now waiting are read: a verdict decided from them then does not infer from the
/// absence of an event that may be among the lost. One map read per drain.
fn note_loss(tracer: &Tracer, engine: &mut Engine, known: &mut u64) {
    if let Ok(total) = tracer.lost_events()
        && total > *known
    {
        *known = total;
        engine.events_lost(Clock::mono_now_ns());
    }
}

/// Prints a `lost` record whenever the kernel-side loss counter grew.
fn report_lost(tracer: &Tracer, out: &mut Output, seen: &mut u64) -> Result<(), OutputError> {
    match tracer.lost_events() {
        Ok(total) if total > *seen => {
            let new = total - *seen;
            *seen = total;
            warn!(new, total, "kernel events lost: the ring buffer was full");
            out.write(&Record::Lost(Lost {
                count: total,
                new,
                ts_ns: Clock::mono_now_ns(),
            }))
        }
        Ok(_) => Ok(()),
        Err(e) => {
            warn!("read the LOST map: {e}");
            Ok(())
        }
    }
}

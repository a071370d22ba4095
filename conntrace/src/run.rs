//! The event loop: ring buffer → decoder → reason engine → output, until the end of the run.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};
use tracing::{debug, warn};

use crate::{
    cli::Cli,
    engine::{Engine, EngineConfig, verdict::Verdict},
    host::{counters::OverflowWatch, listeners::ListenerCache, rules::RuleCounters},
    kernel::{
        LoadError, Tracer, TracerOptions, attach::Capability, decode::Decoder, kallsyms::Kallsyms,
    },
    output::metrics::{self, Metrics},
    output::{Clock, Final, Format, KernelFeatures, Lost, Output, OutputError, Ready, Record},
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
}

fn kernel_features() -> KernelFeatures {
    KernelFeatures {
        btf: std::path::Path::new(crate::kernel::btf::VMLINUX_BTF).exists(),
    }
}

/// Writes the engine's drop records, then `verdicts` (drops come first in time).
fn write_verdicts(
    out: &mut Output,
    engine: &mut Engine,
    verdicts: &[Verdict],
) -> Result<(), OutputError> {
    engine
        .take_drops()
        .iter()
        .try_for_each(|d| out.write(&Record::Drop(d)))?;
    verdicts
        .iter()
        .try_for_each(|v| out.write(&Record::Verdict(v)))
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
    // Open the output first: a bad path fails before anything is loaded into the kernel.
    let clock = Clock::now();
    let format = if cli.json {
        Format::Json
    } else {
        Format::Human { wide: cli.wide }
    };
    let mut out = Output::open(cli.output.as_deref(), format, clock)?;
    // Bind the metrics address before loading anything, too.
    let metrics = match cli.metrics_addr {
        Some(addr) => {
            let listener = metrics::bind(addr).await?;
            let m = Arc::new(Metrics::new(cli.ring_buffer_bytes));
            tokio::spawn(metrics::serve(listener, Arc::clone(&m)));
            out = out.with_metrics(Arc::clone(&m));
            Some(m)
        }
        None => None,
    };
    let (mut tracer, events) = Tracer::start(&TracerOptions {
        ports: ports.clone(),
        ring_bytes: cli.ring_buffer_bytes,
        without: cli.without.clone(),
        mode: cli.attach,
    })?;

    let attach_paths: BTreeMap<String, String> = tracer
        .active
        .iter()
        .map(|p| {
            let cap = serde_json::to_value(p.capability)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            (
                cap,
                p.attach.split(':').next().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let ready = Ready {
        ts_ns: Clock::mono_now_ns(),
        version: env!("CARGO_PKG_VERSION"),
        ports,
        programs: tracer.active.clone(),
        unavailable: tracer.unavailable.clone(),
        kernel: tracer.kernel_release.clone(),
        attach_paths,
        kernel_features: kernel_features(),
        ring_buffer_bytes: cli.ring_buffer_bytes,
        degraded: tracer.missing_offsets.clone(),
    };
    // The firewall's rule counters before any traffic is traced: the baseline that later
    // netfilter drops are measured against.
    let rules = tracer
        .active
        .iter()
        .any(|p| p.capability == Capability::Drops)
        .then(RuleCounters::new);
    let mut overflows = OverflowWatch::new(&cli.ports);
    out.write(&Record::Ready(&ready))?;

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
        ..EngineConfig::default()
    })
    .with_listener_lookup(Box::new(ListenerCache::new(tracer.accept_queues.take())));
    if let Some(rules) = rules {
        engine = engine.with_rule_lookup(Box::new(rules));
    }
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
    // The programs wake userspace only when a quarter of the ring is waiting: drain often.
    let mut drain_tick = tokio::time::interval(Duration::from_millis(5));
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut overflow_poll = tokio::time::interval(Duration::from_secs(1));
    let mut ring_peak_poll = tokio::time::interval(Duration::from_secs(1));
    let (mut lost_seen, mut decode_errors) = (0u64, 0u64);

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(RunError::Poll)?;
                let verdicts = drain(guard.get_inner_mut(), &decoder, &mut engine, &mut decode_errors);
                guard.clear_ready();
                write_verdicts(&mut out, &mut engine, &verdicts)?;
            }
            _ = drain_tick.tick() => {
                let verdicts = drain(ring.get_mut(), &decoder, &mut engine, &mut decode_errors);
                write_verdicts(&mut out, &mut engine, &verdicts)?;
            }
            _ = tick.tick() => {
                let verdicts = engine.tick(Clock::mono_now_ns());
                write_verdicts(&mut out, &mut engine, &verdicts)?;
                report_lost(&tracer, &mut out, &mut lost_seen)?;
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
            _ = overflow_poll.tick() => {
                let mut verdicts = Vec::new();
                for ev in overflows.poll(Clock::mono_now_ns()) {
                    verdicts.extend(engine.handle(ev));
                }
                write_verdicts(&mut out, &mut engine, &verdicts)?;
            }
            _ = sigint.recv() => { debug!("SIGINT"); break }
            _ = sigterm.recv() => { debug!("SIGTERM"); break }
            () = &mut deadline => { debug!("duration elapsed"); break }
        }
    }

    let mut verdicts = drain(ring.get_mut(), &decoder, &mut engine, &mut decode_errors);
    for ev in overflows.poll(Clock::mono_now_ns()) {
        verdicts.extend(engine.handle(ev));
    }
    let open_at_exit = engine.tracked();
    verdicts.extend(engine.finish(Clock::mono_now_ns()));
    write_verdicts(&mut out, &mut engine, &verdicts)?;
    report_lost(&tracer, &mut out, &mut lost_seen)?;
    let now = Clock::mono_now_ns();
    let read_failures = tracer.read_failures().unwrap_or_else(|error| {
        warn!(%error, "read the READ_FAILURES map");
        BTreeMap::new()
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
    }))?;
    Ok(())
}

/// Reads every record the ring buffer holds now.
fn drain(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    decoder: &Decoder,
    engine: &mut Engine,
    decode_errors: &mut u64,
) -> Vec<Verdict> {
    let mut verdicts = Vec::new();
    while let Some(item) = ring.next() {
        match decoder.decode(&item) {
            Ok(ev) => {
                tracing::trace!(?ev, "kernel event");
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

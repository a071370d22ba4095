//! Prometheus exposition (`--metrics-addr`): every record written also updates counters, served
//! at `GET /metrics` in the OpenMetrics text format by `prometheus-client` over `hyper`.
//! `GET /healthz` beside it answers `200 ok` once tracing is ready (the `ready` record was
//! written) and `503` before that and after the summary: the probe of a Kubernetes DaemonSet.
//!
//! With `--metrics-container-labels`, verdicts and drops also carry `namespace`, `pod` and
//! `container` (kube-state-metrics' names; empty when the record has none): one series per
//! container, reason and port, so on a node whose containers come and go the series grow with
//! every new pod name until conntrace restarts. Off by default for that reason.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use super::Record;

mod bpf;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    side: String,
    outcome: String,
    reason: String,
    /// The connection's service port: the server's local port, the client's remote one.
    port: String,
    /// `namespace`, `pod`, `container` with `--metrics-container-labels`, else none.
    #[prometheus(flatten)]
    who: Vec<(&'static str, String)>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: String,
    #[prometheus(flatten)]
    who: Vec<(&'static str, String)>,
}

/// The container labels of a record's container (empty values when it has none).
fn who(c: Option<&crate::identity::Container>) -> Vec<(&'static str, String)> {
    let k8s = c.and_then(|c| c.k8s.as_ref());
    vec![
        (
            "namespace",
            k8s.map(|k| k.namespace.clone()).unwrap_or_default(),
        ),
        ("pod", k8s.map(|k| k.pod.clone()).unwrap_or_default()),
        (
            "container",
            c.and_then(|c| {
                c.name
                    .clone()
                    .or_else(|| Some(c.id.chars().take(12).collect()))
            })
            .unwrap_or_default(),
        ),
    ]
}

/// The metrics conntrace exports.
pub struct Metrics {
    registry: Registry,
    verdicts: Family<VerdictLabels, Counter>,
    drops: Family<DropLabels, Counter>,
    lost: Counter,
    ring_peak: Gauge,
    /// `--metrics-container-labels`.
    container_labels: bool,
    /// Tracing: between the `ready` record and the summary.
    tracing: AtomicBool,
    /// What conntrace's programs cost the kernel (`--bpf-stats` only).
    bpf_programs: bpf::ProgramCosts,
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("listen for metrics on {addr} (bind): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serve metrics (a thread and its runtime: clone, epoll_create): {0}")]
    Serve(#[source] std::io::Error),
}

impl Metrics {
    /// `container_labels`: label verdicts and drops with their container and pod; `node`: a
    /// `node` label on every metric (`--node`, NODE_NAME).
    pub fn new(ring_bytes: u32, container_labels: bool, node: Option<&str>) -> Self {
        let labels = node.map(|n| {
            (
                std::borrow::Cow::Borrowed("node"),
                std::borrow::Cow::Owned(n.to_owned()),
            )
        });
        let mut registry = Registry::with_prefix_and_labels("conntrace", labels.into_iter());
        let verdicts = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "verdicts",
            "Verdicts issued, by side, outcome, reason and service port",
            verdicts.clone(),
        );
        let drops = Family::<DropLabels, Counter>::default();
        registry.register(
            "drops",
            "Dropped packets on traced ports reported alone (drop records), by kernel drop reason",
            drops.clone(),
        );
        let lost = Counter::default();
        registry.register(
            "lost_events",
            "Kernel events lost because the ring buffer was full",
            lost.clone(),
        );
        let ring_peak: Gauge = Gauge::default();
        registry.register(
            "ring_buffer_peak_bytes",
            "Most bytes waiting in the kernel ring buffer during the last second",
            ring_peak.clone(),
        );
        let size: Gauge = Gauge::default();
        size.set(i64::from(ring_bytes));
        registry.register(
            "ring_buffer_size_bytes",
            "Size of the kernel ring buffer",
            size,
        );
        let bpf_programs = bpf::ProgramCosts::default();
        registry.register_collector(Box::new(bpf_programs.clone()));
        Self {
            registry,
            verdicts,
            drops,
            lost,
            ring_peak,
            container_labels,
            tracing: AtomicBool::new(false),
            bpf_programs,
        }
    }

    /// Counts what a record says.
    pub fn observe(&self, record: &Record<'_>) {
        match record {
            Record::Verdict(v) => {
                self.verdicts
                    .get_or_create(&VerdictLabels {
                        side: v.side.name().to_owned(),
                        outcome: v.outcome.name().to_owned(),
                        reason: v.reason.code().to_owned(),
                        port: v.service_port().unwrap_or(0).to_string(),
                        who: self.who(v.container.as_ref()),
                    })
                    .inc();
            }
            Record::Drop(d) => {
                self.drops
                    .get_or_create(&DropLabels {
                        reason: d.kernel_reason.to_string(),
                        who: self.who(d.container.as_ref()),
                    })
                    .inc();
            }
            Record::Lost(l) => {
                self.lost.inc_by(l.new);
            }
            Record::Ready(_) => self.tracing.store(true, Ordering::Relaxed),
            Record::Summary(_) => self.tracing.store(false, Ordering::Relaxed),
        }
    }

    fn who(&self, c: Option<&crate::identity::Container>) -> Vec<(&'static str, String)> {
        if self.container_labels {
            who(c)
        } else {
            Vec::new()
        }
    }

    pub fn set_ring_peak(&self, bytes: u64) {
        self.ring_peak.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// What each program cost the kernel so far (`--bpf-stats`): from the first call on, the
    /// `conntrace_bpf_program_*` metrics are exposed.
    pub fn set_program_costs(&self, costs: Vec<crate::kernel::stats::ProgramCost>) {
        self.bpf_programs.set(costs);
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            // Encoding into a String cannot fail; an empty page is the safe answer anyway.
            text.clear();
        }
        text
    }

    /// Status, body and content type for `method` on `path`. `HEAD` answers as `GET` (hyper
    /// sends no body), for probes that use it.
    fn route(&self, method: &Method, path: &str) -> (StatusCode, String, &'static str) {
        const TEXT: &str = "text/plain; charset=utf-8";
        let method = if method == Method::HEAD {
            &Method::GET
        } else {
            method
        };
        match (method, path) {
            (&Method::GET, "/metrics") => (
                StatusCode::OK,
                self.encode(),
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
            (&Method::GET, "/healthz") if self.tracing.load(Ordering::Relaxed) => {
                (StatusCode::OK, "ok\n".to_owned(), TEXT)
            }
            (&Method::GET, "/healthz") => (
                StatusCode::SERVICE_UNAVAILABLE,
                "not tracing\n".to_owned(),
                TEXT,
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "conntrace serves GET /metrics and GET /healthz\n".to_owned(),
                TEXT,
            ),
        }
    }

    fn respond(&self, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let (status, body, kind) = self.route(req.method(), req.uri().path());
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(kind) {
            resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        resp
    }
}

/// Binds `addr` now (so a bad address fails at start-up) and returns the listener.
///
/// # Errors
/// [`MetricsError::Bind`]: the address is taken or not this host's (`bind(2)`).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, MetricsError> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| MetricsError::Bind { addr, source })?;
    Ok(listener)
}

/// Serves `listener` on a thread of its own with its own single-threaded runtime, so that
/// `/healthz` answers `503` at once while the eBPF programs load (which holds the main
/// runtime's only thread for about a second) and scrapes are answered while the main loop is
/// busy with a burst of events. The thread ends with the process.
///
/// # Errors
/// [`MetricsError::Serve`]: the thread or its runtime could not be created.
pub fn spawn(listener: std::net::TcpListener, metrics: Arc<Metrics>) -> Result<(), MetricsError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(MetricsError::Serve)?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => serve(listener, metrics).await,
                    Err(error) => warn!(%error, "serve metrics: register the listener"),
                }
            });
        })
        .map_err(MetricsError::Serve)?;
    Ok(())
}

/// Serves `GET /metrics` and `GET /healthz` on `listener` until the runtime stops.
async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                debug!(%error, "accept a metrics connection");
                continue;
            }
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let resp = metrics.respond(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%error, "serve a metrics connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_labels_every_metric() {
        let m = Metrics::new(4096, false, Some("worker-3"));
        m.observe(&Record::Lost(crate::output::Lost {
            count: 3,
            new: 3,
            ts_ns: 0,
        }));
        let text = m.encode();
        assert!(
            text.contains(r#"conntrace_lost_events_total{node="worker-3"} 3"#),
            "{text}"
        );
        let samples: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect();
        assert!(!samples.is_empty());
        for line in samples {
            assert!(line.contains(r#"node="worker-3""#), "{line}");
        }
    }

    #[test]
    fn exposition_names_and_labels() {
        let m = Metrics::new(4096, false, None);
        m.observe(&Record::Lost(crate::output::Lost {
            count: 3,
            new: 3,
            ts_ns: 0,
        }));
        m.set_ring_peak(1024);
        let text = m.encode();
        assert!(text.contains("conntrace_lost_events_total 3"), "{text}");
        assert!(
            text.contains("conntrace_ring_buffer_peak_bytes 1024"),
            "{text}"
        );
        assert!(
            text.contains("conntrace_ring_buffer_size_bytes 4096"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn container_labels_only_when_asked() {
        use crate::identity::{Container, K8s, Runtime, Via};
        let mut v = crate::output::tests::syn_timeout();
        v.container = Some(Container {
            runtime: Runtime::Containerd,
            id: "ct-db-0".into(),
            name: Some("mysql".into()),
            image: None,
            k8s: Some(K8s {
                namespace: "shop".into(),
                pod: "db-0".into(),
                container: Some("mysql".into()),
            }),
            via: Via::Netns,
        });
        let labelled = Metrics::new(4096, true, None);
        labelled.observe(&Record::Verdict(&v));
        let text = labelled.encode();
        assert!(
            text.contains(r#"namespace="shop",pod="db-0",container="mysql"} 1"#),
            "{text}"
        );
        let plain = Metrics::new(4096, false, None);
        plain.observe(&Record::Verdict(&v));
        let text = plain.encode();
        assert!(
            text.contains(r#"port="3306"} 1"#) && !text.contains("pod="),
            "{text}"
        );
    }

    fn ready() -> crate::output::Ready {
        crate::output::Ready {
            ts_ns: 0,
            version: "0.1.0",
            ports: vec![3306],
            follow: crate::kernel::attach::Follow::Quiet,
            programs: Vec::new(),
            unavailable: Vec::new(),
            kernel: "6.18.44".into(),
            attach_paths: Default::default(),
            kernel_features: crate::output::KernelFeatures { btf: true },
            ring_buffer_bytes: 4096,
            degraded: Vec::new(),
        }
    }

    #[test]
    fn healthz_is_ok_only_while_tracing() {
        let m = Metrics::new(4096, false, None);
        let healthz = |m: &Metrics| {
            let (status, body, _) = m.route(&Method::GET, "/healthz");
            (status.as_u16(), body)
        };
        // Bound before anything is loaded: not ready yet.
        assert_eq!(healthz(&m), (503, "not tracing\n".to_owned()));
        m.observe(&Record::Ready(&ready()));
        assert_eq!(healthz(&m), (200, "ok\n".to_owned()));
        assert_eq!(m.route(&Method::GET, "/metrics").0, StatusCode::OK);
        assert_eq!(m.route(&Method::GET, "/other").0, StatusCode::NOT_FOUND);
        assert_eq!(m.route(&Method::POST, "/healthz").0, StatusCode::NOT_FOUND);
        assert_eq!(m.route(&Method::HEAD, "/healthz").0, StatusCode::OK);
        // The summary is the last record: the run is ending.
        let summary = crate::engine::verdict::Summary::default();
        m.observe(&Record::Summary(crate::output::Final {
            ts_ns: 0,
            summary: &summary,
            lost_events: 0,
            decode_errors: 0,
            duration_ms: 1.0,
            tracked_at_exit: 0,
            tcp_counters: Default::default(),
            read_failures: Default::default(),
            program_misses: Default::default(),
            all_ports: false,
            programs: None,
        }));
        assert_eq!(healthz(&m).0, 503);
    }
}

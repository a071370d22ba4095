//! The engine's settings.

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Emit a verdict for established connections too (`--all`).
    pub report_established: bool,
    /// How long an established connection may go without receiving data (client) or being
    /// accepted (server) before it is reported stalled; 0 turns stall verdicts off.
    pub stall_timeout_ns: u64,
    /// How long a closed connection waits for late facts (error report) before it is decided.
    pub grace_ns: u64,
    /// Most connections tracked at once; the oldest are forgotten (and counted) beyond it.
    pub max_connections: usize,
    /// Most connection attempts without a socket (dropped handshakes, SYN cookies) tracked at
    /// once, and most decided ones remembered: a flood of spoofed SYNs opens one per SYN,
    /// each kept with its drops (the README's 100,000-SYN flood peaked at 87 MiB with the
    /// connection cap here and larger drop entries, 47 MiB since). Beyond it a drop is a
    /// `drop` record (capped per second, counted in `drops_by_reason`).
    pub max_attempts: usize,
    /// Most connections whose drops are kept while no connection here takes them: forwarded
    /// packets' drops (kept 5 minutes after the last, for an end that is a local namespace's),
    /// and drops of established connections not followed. A flood through a forwarding
    /// host's firewall fills it, one connection per source port (100,000 SYNs: 65.3 MiB peak
    /// with the connection cap here, 45.5 MiB with this one). Beyond it the
    /// drop is still counted and recorded (capped per second), only not kept.
    pub max_kept_drops: usize,
    /// A connection with no event for this long is forgotten (and counted if unresolved).
    pub idle_expiry_ns: u64,
    /// Whether resets are observed (the reset tracepoints attached). Without them, ECONNREFUSED
    /// cannot be told apart from an ICMP port unreachable.
    pub resets_observed: bool,
    /// Whether the kernel traces resets sent without a socket (`tcp_send_reset` from 6.10).
    /// Before that a refused SYN shows only as its `NO_SOCKET` drop, which then is the
    /// server's refusal.
    pub socketless_resets_traced: bool,
    /// `--expect-comm`: the only processes that should accept connections on the traced ports;
    /// empty means any.
    pub expected_comms: Vec<String>,
    /// Print `drop` records for drops that are a normal part of TCP too
    /// (`--show-normal-drops`).
    pub show_normal_drops: bool,
    /// Quiet mode (`--follow quiet`): healthy connections stay in the kernel, which counts
    /// handshakes itself (so the engine does not); first data and accept() come only from
    /// userspace's check of connections past the stall timeout (`KernelEvent::Progress`), so
    /// a connection is stuck for want of data or accept() only once a check said so.
    pub quiet: bool,
    /// Whether a connection's first data received and sent is traced when connections stream
    /// (the first-data hooks attached: `sock:sk_data_ready` 6.6+, `fexit:tcp_rcv_established`).
    /// Without it a streaming client's greeting or answer is never seen, so no
    /// `stalled_no_greeting` or `stalled_no_response` is claimed (quiet mode's check asks
    /// sock_diag instead).
    pub first_data_traced: bool,
    /// The traced ports (`--port`; empty: every port). They tell the side of a connection
    /// first seen mid-life (opened before conntrace started): the end whose own port is
    /// traced is the server.
    pub ports: Vec<u16>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            report_established: false,
            stall_timeout_ns: 3_000_000_000,
            grace_ns: 200_000_000,
            max_connections: 65_536,
            max_attempts: 16_384,
            max_kept_drops: 16_384,
            idle_expiry_ns: 3_600_000_000_000,
            resets_observed: true,
            socketless_resets_traced: true,
            expected_comms: Vec::new(),
            show_normal_drops: false,
            quiet: false,
            first_data_traced: true,
            ports: Vec::new(),
        }
    }
}

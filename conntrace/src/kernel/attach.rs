//! The one table of attach rules: which program serves which capability, on which kernels,
//! in which order of preference. Start-up walks it; nothing else decides where to attach.

use serde::Serialize;

/// What conntrace can observe. Each capability is served by the first rule that applies to
/// the running kernel and attaches; later rules are fallbacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    /// TCP state transitions (connect start, handshake done, close). Required.
    Lifecycle,
    /// The error a socket reports (ECONNREFUSED, ETIMEDOUT, EHOSTUNREACH, ...).
    SocketError,
    /// Resets received and sent.
    Resets,
    /// SYN retransmissions.
    SynRetransmits,
    /// The connecting process and `connect()`'s own errors (e.g. ENETUNREACH before any packet).
    ConnectProcess,
    /// `connect()` refused by a cgroup program (a policy agent's `cgroup/connect4`) before any
    /// packet, where `connect()`'s own result is not read (quiet mode without fexit): root
    /// cgroup `connect4`/`connect6` programs that only look (6.1+).
    ConnectDenied,
    /// The accepting process.
    AcceptProcess,
    /// Packets the kernel dropped, with its drop reason (`kfree_skb` with a reason: 5.17+).
    Drops,
    /// The first data received and sent on a connection (stalled connections).
    FirstData,
    /// SYN cookies sent by listeners.
    SynCookies,
    /// Which listener socket's accept queue holds a connection (SO_REUSEPORT groups): an
    /// `iter/tcp` iterator, run on demand rather than attached to a hook.
    AcceptQueues,
}

impl std::fmt::Display for Capability {
    /// The name `--without` takes, e.g. `syn-cookies`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum as _;
        match self.to_possible_value() {
            Some(v) => f.write_str(v.get_name()),
            None => write!(f, "{self:?}"),
        }
    }
}

/// How a program attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// A classic tracepoint `category:name`.
    TracePoint {
        category: &'static str,
        name: &'static str,
    },
    /// A BPF trampoline at a kernel function's entry (fentry) or return (fexit). Cheaper than
    /// kprobes and typed by BTF; some kernels refuse them (this project's host: EPERM).
    FEntry {
        function: &'static str,
    },
    FExit {
        function: &'static str,
    },
    /// A BTF-typed tracepoint (`tp_btf`): the kernel calls the program with the tracepoint's
    /// arguments (the socket, the packet) instead of building the classic record first.
    BtfTracePoint {
        name: &'static str,
    },
    /// A `BPF_PROG_TYPE_CGROUP_SOCK_ADDR` program on the root cgroup (v2) at `attach`
    /// (`connect4`, `connect6`): it runs for every `connect()` of every process, after the
    /// programs of the socket's own cgroups.
    Cgroup {
        attach: &'static str,
    },
}

impl Hook {
    pub fn describe(&self) -> String {
        match self {
            Self::TracePoint { category, name } => format!("tracepoint:{category}:{name}"),
            Self::FEntry { function } => format!("fentry:{function}"),
            Self::FExit { function } => format!("fexit:{function}"),
            Self::BtfTracePoint { name } => format!("tp_btf:{name}"),
            Self::Cgroup { attach } => format!("cgroup:{attach}"),
        }
    }

    #[cfg(test)]
    pub fn is_tracepoint(&self) -> bool {
        matches!(self, Self::TracePoint { .. })
    }

    /// Whether `--attach tracepoints` uses this hook: the classic tracepoints, and the cgroup
    /// hooks, which have no BTF-typed or trampoline alternative.
    pub fn in_tracepoints_mode(&self) -> bool {
        matches!(self, Self::TracePoint { .. } | Self::Cgroup { .. })
    }
}

/// Which kinds of hook start-up may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AttachMode {
    /// The best path each capability has on this kernel (fentry/fexit where they attach).
    #[default]
    Best,
    /// Tracepoints only (and the cgroup hooks, which have no other form): the path that works
    /// on every supported kernel.
    Tracepoints,
}

/// Which way conntrace follows healthy connections, which decides the hooks it needs.
///
/// `Quiet` (the default): healthy connections stay in the kernel; only a connection that
/// fails, stalls or is reset reaches userspace, with its history. Hooks that run for every
/// system call of every process (the syscall tracepoints) or for every data segment are not
/// attached. `Streaming` (`--all`, `--expect-comm`): every connection's events reach
/// userspace, with its accepting process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Follow {
    Quiet,
    Streaming,
}

/// In which of the [`Follow`] modes a rule is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Always,
    /// Only when every connection streams to userspace: the hook's cost is paid by every
    /// process (syscall tracepoints) or every segment (first data).
    Streaming,
    /// Only in quiet mode: a cheaper hook standing in for one that only streaming uses.
    Quiet,
}

impl When {
    pub fn admits(self, follow: Follow) -> bool {
        match self {
            Self::Always => true,
            Self::Streaming => follow == Follow::Streaming,
            Self::Quiet => follow == Follow::Quiet,
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct AttachRule {
    pub capability: Capability,
    /// Lower runs first among the rules of one capability.
    pub priority: u8,
    /// Name of the program in the eBPF object.
    pub program: &'static str,
    pub hook: Hook,
    /// Oldest kernel (major, minor) the hook exists on.
    pub min_kernel: (u32, u32),
    /// Newest kernel the rule is meant for, if the hook changed meaning after it.
    pub max_kernel: Option<(u32, u32)>,
    /// Whether conntrace refuses to start without this capability.
    pub required: bool,
    /// In which follow modes the rule is tried.
    pub when: When,
}

const fn tp(
    capability: Capability,
    program: &'static str,
    category: &'static str,
    min_kernel: (u32, u32),
    required: bool,
) -> AttachRule {
    AttachRule {
        capability,
        priority: TRACEPOINT,
        program,
        hook: Hook::TracePoint {
            category,
            name: program,
        },
        min_kernel,
        max_kernel: None,
        required,
        when: When::Always,
    }
}

/// A tracepoint rule tried only in the follow modes `when` admits.
const fn tp_when(
    capability: Capability,
    program: &'static str,
    category: &'static str,
    min_kernel: (u32, u32),
    when: When,
) -> AttachRule {
    AttachRule {
        when,
        ..tp(capability, program, category, min_kernel, false)
    }
}

/// An fentry (`exit` false) or fexit rule on `function`; `max_kernel` bounds rules that only a
/// fallback needs.
const fn trampoline(
    capability: Capability,
    priority: u8,
    program: &'static str,
    function: &'static str,
    exit: bool,
    kernels: ((u32, u32), Option<(u32, u32)>),
) -> AttachRule {
    AttachRule {
        capability,
        priority,
        program,
        hook: if exit {
            Hook::FExit { function }
        } else {
            Hook::FEntry { function }
        },
        min_kernel: kernels.0,
        max_kernel: kernels.1,
        required: false,
        when: When::Always,
    }
}

/// Priority of fentry/fexit rows that are better than the tracepoints where both exist.
const BETTER: u8 = 5;
/// Priority of the `tp_btf` rows.
const BTF_TRACEPOINT: u8 = 7;
/// Priority of the tracepoint rows.
const TRACEPOINT: u8 = 10;

/// A `tp_btf` rule for `capability` on tracepoint `name`: better than its classic row, not as
/// good as a trampoline at the function itself.
const fn btf_tp(capability: Capability, program: &'static str, name: &'static str) -> AttachRule {
    AttachRule {
        capability,
        priority: BTF_TRACEPOINT,
        program,
        hook: Hook::BtfTracePoint { name },
        // tp_btf came with 5.5; these tracepoints' arguments are stable since.
        min_kernel: (5, 5),
        max_kernel: None,
        required: false,
        when: When::Always,
    }
}

/// A quiet-mode rule for `capability` on the root cgroup's `attach` hook. `bpf_get_retval`,
/// which the program asks whether an earlier program refused, came to these programs with 6.1
/// (5.18 had it for the device, sysctl and sockopt hooks only).
const fn cgroup(capability: Capability, program: &'static str, attach: &'static str) -> AttachRule {
    AttachRule {
        capability,
        priority: TRACEPOINT,
        program,
        hook: Hook::Cgroup { attach },
        min_kernel: (6, 1),
        max_kernel: None,
        required: false,
        when: When::Quiet,
    }
}

/// The hook among `active` (attached so far) whose program already serves `capability`, which
/// is then not attached (the two would report the same fact twice): a cgroup program's
/// refusal is `connect()`'s result, which fexit:inet_stream_connect reads where it attached.
/// `ConnectProcess` is attached first (table order).
pub fn served_by(capability: Capability, active: &[(Capability, Hook)]) -> Option<Hook> {
    let fexit = |(c, h): &&(Capability, Hook)| {
        *c == Capability::ConnectProcess && matches!(h, Hook::FExit { .. })
    };
    if capability != Capability::ConnectDenied {
        return None;
    }
    active.iter().find(fexit).map(|(_, h)| *h)
}

/// Every attach rule.
#[rustfmt::skip]
pub const RULES: &[AttachRule] = &[
    // fentry/fexit first where they serve better: fewer or cheaper runs, facts from the
    // function itself. BPF trampolines came with 5.5; fexit programs read the function's
    // result from their context, not with bpf_get_func_ret (5.17, and unreliable on 6.1). A row
    // that does not load on an older kernel leaves its capability to the tracepoint rows.
    // BTF-typed tracepoints where they load: no record built per run (the lifecycle program
    // runs about ten times per connection, the cookie program once per packet sent).
    btf_tp(Capability::Lifecycle,  "tp_btf_inet_sock_set_state", "inet_sock_set_state"),
    btf_tp(Capability::SynCookies, "tp_btf_net_dev_queue",       "net_dev_queue"),
    // kfree_skb passes `rx_sk` to BTF-typed programs since 6.11 (the program reads it).
    AttachRule { min_kernel: (6, 11), ..btf_tp(Capability::Drops, "tp_btf_kfree_skb", "kfree_skb") },
    // Quiet mode's connect() errors: no record built for the lookups that succeed.
    AttachRule { when: When::Quiet, ..btf_tp(Capability::ConnectProcess, "tp_btf_fib_table_lookup",  "fib_table_lookup") },
    AttachRule { when: When::Quiet, ..btf_tp(Capability::ConnectProcess, "tp_btf_fib6_table_lookup", "fib6_table_lookup") },
    //          capability                  priority    program                               function                    fexit  kernels
    trampoline(Capability::ConnectProcess, BETTER,     "fexit_inet_stream_connect",          "inet_stream_connect",      true,  ((5, 5), None)),
    // Not fexit:inet_csk_accept: it misses accept() calls already waiting at attach.
    // __inet_accept came with 6.8 and is in later 6.1.y (Debian's 6.1.0-56 has it); where it
    // is missing, loading fails and the syscall tracepoints serve.
    trampoline(Capability::AcceptProcess,  BETTER,     "fentry_inet_accept",                 "__inet_accept",            false, ((6, 1), None)),
    trampoline(Capability::SynCookies,     BETTER,     "fentry_cookie_v4_init_sequence",     "cookie_v4_init_sequence",  false, ((5, 5), None)),
    trampoline(Capability::SynCookies,     BETTER,     "fentry_cookie_v6_init_sequence",     "cookie_v6_init_sequence",  false, ((5, 5), None)),
    // First data before `sock:sk_data_ready` (6.6) and `sock:sock_send_length` (6.3).
    // Quiet mode reads a stalled connection's data counters through sock_diag instead.
    AttachRule { when: When::Streaming, ..trampoline(Capability::FirstData, TRACEPOINT, "fexit_tcp_rcv_established", "tcp_rcv_established", true, ((5, 5), Some((6, 5)))) },
    AttachRule { when: When::Streaming, ..trampoline(Capability::FirstData, TRACEPOINT, "fexit_tcp_sendmsg", "tcp_sendmsg", true, ((5, 5), Some((6, 2)))) },
    //  capability                      program                  category    min kernel  required
    tp(Capability::Lifecycle,       "inet_sock_set_state",  "sock",     (4, 16),    true),
    tp(Capability::SocketError,     "inet_sk_error_report", "sock",     (5, 14),    false),
    tp(Capability::Resets,          "tcp_receive_reset",    "tcp",      (4, 15),    false),
    tp(Capability::Resets,          "tcp_send_reset",       "tcp",      (4, 15),    false),
    tp(Capability::SynRetransmits,  "tcp_retransmit_skb",   "tcp",      (4, 15),    false),
    // A syscall tracepoint puts every system call of every process on the slow path: only
    // when healthy connections stream (quiet mode learns the connecting process at SYN_SENT).
    tp_when(Capability::ConnectProcess, "sys_enter_connect", "syscalls", (4, 7),    When::Streaming),
    tp_when(Capability::ConnectProcess, "sys_exit_connect", "syscalls",  (4, 7),    When::Streaming),
    // Quiet mode learns connect()'s errors before any packet from its failed route lookups
    // (fexit:inet_stream_connect, above, is better where it attaches). The fields read
    // (err, iif, proto, sport, dport) come from the format file; a record without them makes
    // the program report nothing.
    tp_when(Capability::ConnectProcess, "fib_table_lookup", "fib",       (5, 0),    When::Quiet),
    tp_when(Capability::ConnectProcess, "fib6_table_lookup", "fib6",     (5, 0),    When::Quiet),
    // Quiet mode's refusals by a cgroup program, which neither a route lookup nor a state
    // change shows (the syscall tracepoints and fexit see connect()'s result).
    cgroup(Capability::ConnectDenied, "cgroup_connect4", "connect4"),
    cgroup(Capability::ConnectDenied, "cgroup_connect6", "connect6"),
    tp_when(Capability::AcceptProcess, "sys_exit_accept4",  "syscalls",  (4, 7),    When::Streaming),
    tp_when(Capability::AcceptProcess, "sys_exit_accept",   "syscalls",  (4, 7),    When::Streaming),
    // The drop reason argument exists since 5.17.
    tp(Capability::Drops,           "kfree_skb",            "skb",      (5, 17),    false),
    tp_when(Capability::FirstData,  "sk_data_ready",        "sock",     (6, 6),     When::Streaming),
    tp_when(Capability::FirstData,  "sock_send_length",     "sock",     (6, 3),     When::Streaming),
    // A cookie SYN-ACK is the only SYN-ACK sent without an owning socket.
    tp(Capability::SynCookies,      "net_dev_queue",        "net",      (3, 0),     false),
];

impl AttachRule {
    pub fn applies_to(&self, kernel: (u32, u32)) -> bool {
        kernel >= self.min_kernel && self.max_kernel.is_none_or(|max| kernel <= max)
    }
}

/// Parses "6.18.44-fc-v657" into (6, 18).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The rules to try on `kernel` when following connections as `follow` says, grouped by
/// capability in table order, best first.
pub fn plan(kernel: (u32, u32), mode: AttachMode, follow: Follow) -> Vec<AttachRule> {
    let mut rules: Vec<AttachRule> = RULES
        .iter()
        .copied()
        .filter(|r| r.applies_to(kernel) && r.when.admits(follow))
        .filter(|r| mode == AttachMode::Best || r.hook.in_tracepoints_mode())
        .collect();
    rules.sort_by_key(|r| (r.capability as u8, r.priority));
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(kernel_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(kernel_version("6.1.0-56-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("5.14.0-427.el9.x86_64"), Some((5, 14)));
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn every_capability_has_a_tracepoint_path_on_supported_kernels() {
        for kernel in [(5, 15), (6, 1), (6, 12), (6, 18)] {
            let p = plan(kernel, AttachMode::Best, Follow::Streaming);
            for cap in [
                Capability::Lifecycle,
                Capability::SocketError,
                Capability::Resets,
                Capability::SynRetransmits,
                Capability::ConnectProcess,
                Capability::AcceptProcess,
                Capability::Drops,
            ] {
                if cap == Capability::Drops && kernel < (5, 17) {
                    // kfree_skb has no drop reason before 5.17: the capability degrades.
                    assert!(p.iter().all(|r| r.capability != cap), "{kernel:?}");
                    continue;
                }
                assert!(
                    p.iter()
                        .any(|r| r.capability == cap && matches!(r.hook, Hook::TracePoint { .. })),
                    "{cap:?} has no tracepoint rule on {kernel:?}"
                );
            }
        }
        assert!(
            plan((4, 9), AttachMode::Best, Follow::Streaming)
                .iter()
                .all(|r| r.capability != Capability::Lifecycle)
        );
    }

    #[test]
    fn trampolines_come_first_where_they_apply_and_never_in_tracepoint_mode() {
        let best = plan((6, 1), AttachMode::Best, Follow::Streaming);
        let first_of = |cap: Capability| {
            best.iter()
                .find(|r| r.capability == cap)
                .map(|r| r.hook.describe())
        };
        assert_eq!(
            first_of(Capability::AcceptProcess).as_deref(),
            Some("fentry:__inet_accept")
        );
        // Before 6.1 accept() stays on the syscall tracepoints.
        assert_eq!(
            plan((5, 15), AttachMode::Best, Follow::Streaming)
                .iter()
                .find(|r| r.capability == Capability::AcceptProcess)
                .map(|r| r.hook.describe())
                .as_deref(),
            Some("tracepoint:syscalls:sys_exit_accept4")
        );
        assert_eq!(
            first_of(Capability::ConnectProcess).as_deref(),
            Some("fexit:inet_stream_connect")
        );
        assert_eq!(
            first_of(Capability::SynCookies).as_deref(),
            Some("fentry:cookie_v4_init_sequence")
        );
        // Both paths are in the plan: the tracepoints are the fallback when fentry fails.
        assert!(best.iter().any(|r| r.program == "net_dev_queue"));
        // 6.1 has neither first-data tracepoint: only the fexit rows serve it.
        let first_data: Vec<_> = best
            .iter()
            .filter(|r| r.capability == Capability::FirstData)
            .map(|r| r.hook.describe())
            .collect();
        assert_eq!(
            first_data,
            ["fexit:tcp_rcv_established", "fexit:tcp_sendmsg"]
        );
        // 6.12 has the tracepoints: no fexit fallback rows for first data.
        assert!(
            plan((6, 12), AttachMode::Best, Follow::Streaming)
                .iter()
                .filter(|r| r.capability == Capability::FirstData)
                .all(|r| r.hook.is_tracepoint())
        );
        assert!(
            plan((6, 1), AttachMode::Tracepoints, Follow::Streaming)
                .iter()
                .all(|r| r.hook.is_tracepoint())
        );
    }

    #[test]
    fn quiet_mode_attaches_no_syscall_tracepoint_and_no_per_segment_hook() {
        for kernel in [(6, 1), (6, 12), (6, 18)] {
            for mode in [AttachMode::Best, AttachMode::Tracepoints] {
                let quiet = plan(kernel, mode, Follow::Quiet);
                assert!(
                    quiet
                        .iter()
                        .all(|r| !r.hook.describe().contains(":syscalls:")
                            && r.capability != Capability::FirstData),
                    "{kernel:?} {mode:?}: {:?}",
                    quiet.iter().map(|r| r.program).collect::<Vec<_>>()
                );
                assert!(quiet.iter().any(|r| r.capability == Capability::Lifecycle));
                let streaming = plan(kernel, mode, Follow::Streaming);
                assert!(
                    streaming
                        .iter()
                        .any(|r| r.hook.describe().contains(":syscalls:")),
                    "{kernel:?} {mode:?}"
                );
            }
        }
    }

    /// The hooks that serve `ConnectProcess` in this plan, best first.
    fn connect_hooks(kernel: (u32, u32), mode: AttachMode, follow: Follow) -> Vec<String> {
        plan(kernel, mode, follow)
            .iter()
            .filter(|r| r.capability == Capability::ConnectProcess)
            .map(|r| format!("{} {}", r.priority, r.hook.describe()))
            .collect()
    }

    #[test]
    fn connect_errors_come_from_route_lookups_only_in_quiet_mode_and_after_fexit() {
        // The host (6.18, fentry refused): quiet mode's only connect() path is the route
        // lookups; streaming keeps the syscall tracepoints and never the route lookups.
        for kernel in [(6, 1), (6, 12), (6, 18)] {
            assert_eq!(
                connect_hooks(kernel, AttachMode::Tracepoints, Follow::Quiet),
                [
                    "10 tracepoint:fib:fib_table_lookup",
                    "10 tracepoint:fib6:fib6_table_lookup"
                ],
                "{kernel:?}"
            );
            // Where fexit attaches it wins: the route lookups are a lower-priority fallback,
            // tried only when it fails (as it does on the host).
            assert_eq!(
                connect_hooks(kernel, AttachMode::Best, Follow::Quiet),
                [
                    "5 fexit:inet_stream_connect",
                    "7 tp_btf:fib_table_lookup",
                    "7 tp_btf:fib6_table_lookup",
                    "10 tracepoint:fib:fib_table_lookup",
                    "10 tracepoint:fib6:fib6_table_lookup"
                ],
                "{kernel:?}"
            );
            assert_eq!(
                connect_hooks(kernel, AttachMode::Tracepoints, Follow::Streaming),
                [
                    "10 tracepoint:syscalls:sys_enter_connect",
                    "10 tracepoint:syscalls:sys_exit_connect"
                ],
                "{kernel:?}"
            );
            assert_eq!(
                connect_hooks(kernel, AttachMode::Best, Follow::Streaming)[0],
                "5 fexit:inet_stream_connect",
                "{kernel:?}"
            );
        }
    }

    #[test]
    fn quiet_mode_looks_at_connect_refusals_from_the_root_cgroup_where_fexit_does_not() {
        let cgroup_rows = |kernel, mode, follow| -> Vec<String> {
            plan(kernel, mode, follow)
                .iter()
                .filter(|r| r.capability == Capability::ConnectDenied)
                .map(|r| r.hook.describe())
                .collect()
        };
        for mode in [AttachMode::Best, AttachMode::Tracepoints] {
            assert_eq!(
                cgroup_rows((6, 18), mode, Follow::Quiet),
                ["cgroup:connect4", "cgroup:connect6"],
                "{mode:?}"
            );
            // Streaming reads connect()'s result at its syscall tracepoints or fexit.
            assert!(cgroup_rows((6, 18), mode, Follow::Streaming).is_empty());
            // bpf_get_retval came to these programs with 6.1.
            assert!(cgroup_rows((6, 0), mode, Follow::Quiet).is_empty());
        }
        let fexit = (
            Capability::ConnectProcess,
            Hook::FExit {
                function: "inet_stream_connect",
            },
        );
        let fib = (
            Capability::ConnectProcess,
            Hook::BtfTracePoint {
                name: "fib_table_lookup",
            },
        );
        assert_eq!(
            served_by(Capability::ConnectDenied, &[fib, fexit]),
            Some(fexit.1)
        );
        assert_eq!(served_by(Capability::ConnectDenied, &[fib]), None);
        assert_eq!(served_by(Capability::Drops, &[fexit]), None);
    }

    #[test]
    fn program_names_are_unique_and_each_has_its_read_failure_slot() {
        let mut names: Vec<_> = RULES.iter().map(|r| r.program).collect();
        // The iterator is loaded apart from the table (it is run, not attached).
        names.push("accept_queues");
        names.sort();
        names.dedup();
        assert_eq!(names.len(), RULES.len() + 1);
        let mut slots = conntrace_common::programs::NAMES.to_vec();
        slots.sort();
        assert_eq!(names, slots, "programs::NAMES lists every program once");
    }
}

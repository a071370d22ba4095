//! The prologue every scenario shares: the root check, fresh hosts (two on one link, or three
//! with a router between), then set-up steps in the hosts, the server and conntrace, in
//! whichever order the scenario's story needs.

use std::{process::Stdio, time::Duration};

use crate::{Conntrace, Hosts, PORT, Proc, ThreeHosts, TwoHosts, helper_bin, require_root, serve};

/// A scenario's set-up. [`Scenario::new`] checks for root and makes two fresh hosts; each
/// further step runs when it is called, so the calls read in the order the steps happen:
///
/// ```no_run
/// use conntrace_tests::Scenario;
///
/// let Scenario { hosts, ct, server: _server } = Scenario::new()
///     .in_server(&["sysctl", "-qw", "net.ipv4.tcp_syncookies=2"])
///     .serve(&["--greeting", "hello"])
///     .conntrace(&["--port", "3306", "--stall-timeout", "2s"]);
/// ```
///
/// `ct` is the running [`Conntrace`] once [`Scenario::conntrace`] was called (`()` before),
/// `server` the server's [`Proc`] once [`Scenario::serve`] was (`()` before); each can be
/// started once. Bind every part that was started: `server: _server` keeps a server the test
/// never names running to the end, where `..` or `server: _` would kill it at once.
///
/// `hosts` is a [`TwoHosts`] ([`Scenario::new`]) or a [`ThreeHosts`], client and server
/// joined through a router ([`Scenario::routed`]).
///
/// On drop the processes are killed, then the namespaces deleted, also when a test panics.
pub struct Scenario<C = (), S = (), H = TwoHosts> {
    // Fields drop in this order: the processes before their namespaces.
    pub server: S,
    pub ct: C,
    pub hosts: H,
}

impl Scenario {
    /// Checks for root and makes two fresh hosts: the first step of every scenario.
    pub fn new() -> Self {
        require_root();
        Self {
            server: (),
            ct: (),
            hosts: TwoHosts::new(),
        }
    }

    /// Fresh hosts with `ctload serve` (greeting, then close) in the server one on `port`: the
    /// churn of the benchmark and the soak. The client may use every local port (the server
    /// closes first, so TIME_WAIT piles up on its side).
    pub fn churn(port: u16) -> Scenario<(), Proc> {
        Scenario::new()
            .in_client(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"])
            .serve_load(port)
    }

    /// Fresh hosts with `ctload serve --echo` (greeting, then what it reads sent back) in the
    /// server one on `port`: the benchmark's pooled clients.
    pub fn pooled(port: u16) -> Scenario<(), Proc> {
        Scenario::new().serve_load_with(port, &["--echo"])
    }
}

impl Scenario<(), (), ThreeHosts> {
    /// Checks for root and makes three fresh hosts, client and server joined through a router
    /// namespace that forwards between them ([`ThreeHosts`]).
    pub fn routed() -> Self {
        require_root();
        Self {
            server: (),
            ct: (),
            hosts: ThreeHosts::new(),
        }
    }
}

impl<C, S> Scenario<C, S, ThreeHosts> {
    /// Runs a command in the router now (a sysctl, an MTU, a firewall rule).
    pub fn in_router(self, args: &[&str]) -> Self {
        self.hosts.router.exec(args);
        self
    }
}

impl Default for Scenario {
    fn default() -> Self {
        Self::new()
    }
}

impl<C, S, H: Hosts> Scenario<C, S, H> {
    /// Runs a command in the client host now (a sysctl, a firewall rule).
    pub fn in_client(self, args: &[&str]) -> Self {
        self.hosts.client().exec(args);
        self
    }

    /// Runs a command in the server host now (a sysctl, a firewall rule).
    pub fn in_server(self, args: &[&str]) -> Self {
        self.hosts.server().exec(args);
        self
    }

    /// Runs any other set-up step on the hosts now (e.g. a rule a test's caller chose).
    pub fn with(self, step: impl FnOnce(&H)) -> Self {
        step(&self.hosts);
        self
    }
}

impl<S, H> Scenario<(), S, H> {
    /// Starts conntrace in the root namespace now and waits until it is ready
    /// ([`Conntrace::start`] with `args`).
    pub fn conntrace(self, args: &[&str]) -> Scenario<Conntrace, S, H> {
        self.with_conntrace(Conntrace::start(args))
    }

    /// [`Scenario::conntrace`] logging every kernel event it reads, for a failure's message
    /// ([`Conntrace::start_tracing_events`]): for scenarios of a few connections.
    pub fn conntrace_tracing_events(self, args: &[&str]) -> Scenario<Conntrace, S, H> {
        self.with_conntrace(Conntrace::start_tracing_events(args))
    }

    fn with_conntrace(self, ct: Conntrace) -> Scenario<Conntrace, S, H> {
        Scenario {
            server: self.server,
            ct,
            hosts: self.hosts,
        }
    }
}

impl<C, H: Hosts> Scenario<C, (), H> {
    /// Starts `ctpeer serve` on the server host's address and [`PORT`] now, with `extra`
    /// options, and waits until it listens.
    pub fn serve(self, extra: &[&str]) -> Scenario<C, Proc, H> {
        let addr = self.hosts.server_ip().to_owned();
        self.serve_on(&addr, extra)
    }

    /// [`Scenario::serve`] on another address of the server host (its IPv6 address, loopback).
    pub fn serve_on(self, addr: &str, extra: &[&str]) -> Scenario<C, Proc, H> {
        let server = serve(self.hosts.server(), addr, PORT, extra);
        Scenario {
            server,
            ct: self.ct,
            hosts: self.hosts,
        }
    }

    /// Starts `ctload serve` (greeting, then close: churn) on the server host's address and
    /// `port` now.
    pub fn serve_load(self, port: u16) -> Scenario<C, Proc, H> {
        self.serve_load_with(port, &[])
    }

    /// [`Scenario::serve_load`] with more of `ctload serve`'s options (`--echo`).
    pub fn serve_load_with(self, port: u16, extra: &[&str]) -> Scenario<C, Proc, H> {
        let server = Proc::spawn(
            self.hosts
                .server()
                .command(helper_bin("ctload").to_str().expect("utf-8 path"))
                .args(["serve", self.hosts.server_ip(), &port.to_string()])
                .args(extra)
                .stdout(Stdio::null()),
            "ctload serve",
        );
        std::thread::sleep(Duration::from_millis(200));
        Scenario {
            server,
            ct: self.ct,
            hosts: self.hosts,
        }
    }
}

//! Harness for conntrace's integration tests: two hosts made of network namespaces, the real
//! conntrace binary with its real eBPF programs, and test peers. Everything created here is
//! removed on drop, also when a test panics. Helpers panic instead of returning errors.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Panics unless running as root: the scenarios load eBPF programs and create namespaces.
/// Lacking privileges is not a missing kernel feature, so they fail rather than skip.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the scenarios need root: run `cargo xtask test` as root"
    );
}

/// Waits for `child` to exit, panicking with `what` after `timeout` (bounded: no test hangs).
pub fn wait_exit(child: &mut Child, timeout: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still running after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Self {
        sh(&["ip", "netns", "add", name]);
        let ns = Self {
            name: name.to_owned(),
        };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Inode of the namespace, as conntrace reports it in `netns`.
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(format!("/run/netns/{}", self.name))
            .expect("stat netns")
            .ino()
    }

    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes its interfaces, routes and firewall rules.
        let status = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("warning: could not delete netns {}", self.name);
        }
    }
}

static NEXT: AtomicU32 = AtomicU32::new(1);

/// A client and a server namespace joined by a veth pair on 10.77.N.0/24 and fd77:N::/64.
pub struct TwoHosts {
    pub client: Netns,
    pub server: Netns,
    pub client_ip: String,
    pub server_ip: String,
    pub client_ip6: String,
    pub server_ip6: String,
}

impl TwoHosts {
    pub fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}{n}", std::process::id() % 100_000);
        let subnet = 100 + (std::process::id() % 50) * 3 + n % 3;
        let client = Netns::new(&format!("ctc{id}"));
        let server = Netns::new(&format!("cts{id}"));
        let (vc, vs) = (format!("vc{id}"), format!("vs{id}"));
        sh(&[
            "ip", "link", "add", &vc, "type", "veth", "peer", "name", &vs,
        ]);
        sh(&["ip", "link", "set", &vc, "netns", &client.name]);
        sh(&["ip", "link", "set", &vs, "netns", &server.name]);
        let client_ip = format!("10.77.{subnet}.1");
        let server_ip = format!("10.77.{subnet}.2");
        client.exec(&["ip", "addr", "add", &format!("{client_ip}/24"), "dev", &vc]);
        server.exec(&["ip", "addr", "add", &format!("{server_ip}/24"), "dev", &vs]);
        let client_ip6 = format!("fd77:{subnet}::1");
        let server_ip6 = format!("fd77:{subnet}::2");
        client.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{client_ip6}/64"),
            "dev",
            &vc,
            "nodad",
        ]);
        server.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{server_ip6}/64"),
            "dev",
            &vs,
            "nodad",
        ]);
        client.exec(&["ip", "link", "set", &vc, "up"]);
        server.exec(&["ip", "link", "set", &vs, "up"]);
        Self {
            client,
            server,
            client_ip,
            server_ip,
            client_ip6,
            server_ip6,
        }
    }
}

impl TwoHosts {
    /// An address on the hosts' IPv4 subnet that neither host owns (`last` is its last byte).
    pub fn unowned_ip(&self, last: u8) -> String {
        let (net, _) = self.client_ip.rsplit_once('.').expect("IPv4 address");
        format!("{net}.{last}")
    }
}

impl Default for TwoHosts {
    fn default() -> Self {
        Self::new()
    }
}

/// A child process killed on drop. Its stdout, when captured, is read concurrently so a
/// chatty child never blocks on a full pipe.
pub struct Proc {
    pub child: Child,
    output: Option<std::thread::JoinHandle<String>>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process and returns its stdout lines parsed as JSON.
    pub fn json_lines(mut self, timeout: Duration) -> Vec<Value> {
        let what = format!("process {}", self.pid());
        wait_exit(&mut self.child, timeout, &what);
        let out = self
            .output
            .take()
            .map(|h| h.join().expect("stdout reader"))
            .unwrap_or_default();
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("peer line {l:?}: {e}")))
            .collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

fn bin(env: &str, fallback: &str) -> PathBuf {
    std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        root.join(fallback)
    })
}

/// Path of one of this crate's binaries (`ctpeer`, `ctload`): cargo builds them into
/// `target/<profile>/`, the test executables into `target/<profile>/deps/`, and the benchmark
/// runs from `target/<profile>/` itself.
pub fn helper_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let beside = exe.with_file_name(name);
    let path = if beside.exists() {
        beside
    } else {
        let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
        dir.join(name)
    };
    assert!(path.exists(), "{} not built", path.display());
    path
}

/// Path of the test peer binary.
pub fn ctpeer() -> PathBuf {
    helper_bin("ctpeer")
}

/// A `/proc/PID/status` memory figure (`VmRSS`, `VmHWM`) in MiB; 0 when unreadable.
pub fn proc_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Spawns `ctpeer MODE ADDR PORT EXTRA...` in `ns`, stdout piped.
fn spawn_ctpeer(ns: &Netns, mode: &str, addr: &str, port: u16, extra: &[&str]) -> Child {
    ns.command(ctpeer().to_str().expect("utf-8 path"))
        .args([mode, addr, &port.to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn ctpeer {mode}: {e}"))
}

/// Starts `ctpeer serve` in `ns` and waits until it listens.
pub fn serve(ns: &Netns, addr: &str, port: u16, extra: &[&str]) -> Proc {
    let mut child = spawn_ctpeer(ns, "serve", addr, port, extra);
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read ctpeer");
    assert_eq!(line.trim(), "listening", "ctpeer serve did not start");
    Proc {
        child,
        output: None,
    }
}

/// Starts `ctpeer connect` in `ns`; read its results with [`Proc::json_lines`].
pub fn connect(ns: &Netns, addr: &str, port: u16, extra: &[&str]) -> Proc {
    let mut child = spawn_ctpeer(ns, "connect", addr, port, extra);
    let mut stdout = child.stdout.take().expect("stdout");
    let output = std::thread::spawn(move || {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut out).ok();
        out
    });
    Proc {
        child,
        output: Some(output),
    }
}

/// Prints why a test does not run its checks here; `cargo xtask vm-test` counts a passing test
/// that printed a line containing "skip" as skipped. Only for kernel features that are absent.
pub fn skip(reason: &str) {
    println!("SKIP: {reason}");
}

/// How long [`Conntrace::start`] waits for the `ready` line: 60 s, or CONNTRACE_TEST_READY_SECS
/// (`cargo xtask vm-test` sets 240: under emulation, loading the programs takes up to a minute).
pub fn ready_timeout() -> Duration {
    let secs = std::env::var("CONNTRACE_TEST_READY_SECS").ok();
    Duration::from_secs(secs.and_then(|s| s.parse().ok()).unwrap_or(60))
}

/// A line conntrace printed, with when the test received it.
#[derive(Debug, Clone)]
pub struct Line {
    pub value: Value,
    pub received: Instant,
}

/// A running `conntrace --json`, stopped with SIGINT (or killed) on drop.
pub struct Conntrace {
    child: Child,
    lines: Arc<Mutex<Vec<Line>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

pub fn conntrace_bin() -> PathBuf {
    bin("CONNTRACE_BIN", "target/debug/conntrace")
}

impl Conntrace {
    /// Starts conntrace in the root namespace and waits for its `ready` line.
    pub fn start(args: &[&str]) -> Self {
        let path = conntrace_bin();
        assert!(
            path.exists(),
            "{} not built: run `cargo xtask test`",
            path.display()
        );
        // CONNTRACE_ATTACH (`best`, `tracepoints`) runs the same scenarios on another attach
        // path: the VM kernel matrix runs them both ways and both must give the same verdicts.
        let attach = std::env::var("CONNTRACE_ATTACH").ok();
        let mut child = Command::new(&path)
            .arg("--json")
            .args(attach.iter().flat_map(|mode| ["--attach", mode.as_str()]))
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "conntrace=warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn conntrace");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("conntrace printed non-JSON {line:?}: {e}"));
                sink.lock().expect("lines").push(Line {
                    value,
                    received: Instant::now(),
                });
            }
        });
        let ct = Self {
            child,
            lines,
            reader: Some(reader),
        };
        ct.wait_for(ready_timeout(), |l| l.value["event"] == "ready");
        ct
    }

    /// The `ready` line (its attach plan: `attach_paths`, `unavailable`).
    pub fn ready(&self) -> Value {
        self.wait_for(Duration::ZERO, |l| l.value["event"] == "ready")
            .value
    }

    /// True, after printing a skip line with `why`, when this kernel has no hook at all for
    /// `capability` (no attach rule applies to it, e.g. a tracepoint added after this kernel).
    /// A capability whose programs were tried and failed to load is not skipped: that is a
    /// failure to see.
    pub fn lacks(&self, capability: &str, why: &str) -> bool {
        let ready = self.ready();
        let attached = ready["attach_paths"].get(capability).is_some();
        let tried = ready["unavailable"]
            .as_array()
            .is_some_and(|u| u.iter().any(|p| p["capability"] == capability));
        if attached || tried {
            return false;
        }
        skip(&format!(
            "kernel {} has no hook for {capability}: {why}",
            ready["kernel"].as_str().unwrap_or("?")
        ));
        true
    }

    /// Waits until a line matches `pred`, panicking after `timeout`.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Line) -> bool) -> Line {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.lines.lock().expect("lines").iter().find(|l| pred(l)) {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no matching conntrace line within {timeout:?}; got:\n{}",
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (2 s at most) for a verdict in namespace `netns`, then stops conntrace.
    pub fn stop_after_verdict_in(self, netns: u64) -> Vec<Value> {
        self.wait_for(Duration::from_secs(2), |l| {
            l.value["event"] == "verdict" && l.value["netns"] == netns
        });
        self.stop()
    }

    pub fn dump(&self) -> String {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .map(|l| l.value.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops conntrace with SIGINT and returns every line it printed, each validated against
    /// docs/events.schema.json.
    /// The conntrace process id (for CPU and memory figures).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(mut self) -> Vec<Value> {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = wait_exit(
            &mut self.child,
            Duration::from_secs(15),
            "conntrace after SIGINT",
        );
        assert!(status.success(), "conntrace exited with {status}");
        if let Some(r) = self.reader.take() {
            r.join().expect("reader thread");
        }
        let values: Vec<Value> = self
            .lines
            .lock()
            .expect("lines")
            .iter()
            .map(|l| l.value.clone())
            .collect();
        validate(&values);
        assert_eq!(
            values.last().map(|v| v["event"].clone()),
            Some(Value::from("summary")),
            "last line is not the summary"
        );
        values
    }
}

impl Drop for Conntrace {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

/// Validates every line against the documented schema.
pub fn validate(values: &[Value]) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/events.schema.json");
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read schema"))
        .expect("schema is JSON");
    let validator = jsonschema::validator_for(&schema).expect("compile schema");
    for v in values {
        let errors: Vec<String> = validator.iter_errors(v).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "line violates {}: {v}\n{errors:?}",
            path.display()
        );
    }
}

/// Verdicts reported for namespace `netns`.
pub fn verdicts_in(values: &[Value], netns: u64) -> Vec<Value> {
    values
        .iter()
        .filter(|v| v["event"] == "verdict" && v["netns"] == netns)
        .cloned()
        .collect()
}

/// `drop` records for namespace `netns`.
pub fn drops_in(values: &[Value], netns: u64) -> Vec<Value> {
    values
        .iter()
        .filter(|v| v["event"] == "drop" && v["netns"] == netns)
        .cloned()
        .collect()
}

/// The one verdict reported for namespace `netns`; panics unless there is exactly one.
pub fn only_verdict_in(values: &[Value], netns: u64) -> Value {
    let verdicts = verdicts_in(values, netns);
    assert_eq!(
        verdicts.len(),
        1,
        "want exactly one verdict in netns {netns}: {verdicts:?}"
    );
    verdicts.into_iter().next().expect("one verdict")
}

/// A fresh pair of namespaces with `ctload serve` (greeting, then close) in the server one, on
/// `port`: the churn of the benchmark and the soak. The client may use every local port (the
/// server closes first, so TIME_WAIT piles up on its side). The server is killed on drop.
pub struct ChurnHosts {
    pub hosts: TwoHosts,
    pub server: Child,
}

impl ChurnHosts {
    pub fn new(port: u16) -> Self {
        let hosts = TwoHosts::new();
        hosts
            .client
            .exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"]);
        let server = hosts
            .server
            .command(helper_bin("ctload").to_str().expect("utf-8 path"))
            .args(["serve", &hosts.server_ip, &port.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn ctload serve");
        std::thread::sleep(Duration::from_millis(200));
        Self { hosts, server }
    }
}

impl Drop for ChurnHosts {
    fn drop(&mut self) {
        self.server.kill().ok();
        self.server.wait().ok();
    }
}

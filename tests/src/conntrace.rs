//! The real conntrace binary under test, and what it printed.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{Proc, bin, skip};

/// How long [`Conntrace::start`] waits for the `ready` line: 60 s, or CONNTRACE_TEST_READY_SECS
/// (`cargo xtask vm-test` sets 240: under emulation, loading the programs takes up to a minute).
pub fn ready_timeout() -> Duration {
    let secs = std::env::var("CONNTRACE_TEST_READY_SECS").ok();
    Duration::from_secs(secs.and_then(|s| s.parse().ok()).unwrap_or(60))
}

/// How long a test waits for the verdict it expects once the scenario's client is done: the
/// engine decides within its 200 ms grace and a 100 ms tick, and a record waits 250 ms at most
/// for its container; the rest is room for a debug build on a loaded CI machine.
const VERDICT_WAIT: Duration = Duration::from_secs(5);

/// A line conntrace printed, with when the test received it.
#[derive(Debug, Clone)]
pub struct Line {
    pub value: Value,
    pub received: Instant,
}

/// A running `conntrace --json`, stopped with SIGINT by [`Conntrace::stop`], killed on drop.
pub struct Conntrace {
    process: Proc,
    lines: Arc<Mutex<Vec<Line>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    log: Log,
}

/// How many of conntrace's last log lines a failure's message shows.
const LOG_LINES: usize = 400;

/// conntrace's log (its stderr, when the test reads it): the last [`LOG_LINES`] lines, for a
/// failure's message. Lines above DEBUG are passed on to the test's stderr as they come.
#[derive(Clone, Default)]
struct Log {
    lines: Arc<Mutex<VecDeque<String>>>,
    /// Set once the stderr it follows is closed.
    ended: Arc<std::sync::atomic::AtomicBool>,
}

impl Log {
    fn follow(&self, stderr: std::process::ChildStderr) {
        let log = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if !line.contains(" TRACE ") && !line.contains(" DEBUG ") {
                    eprintln!("{line}");
                }
                let mut kept = log.lines.lock().expect("log");
                if kept.len() == LOG_LINES {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
            log.ended.store(true, std::sync::atomic::Ordering::Release);
        });
    }

    /// Waits (a second at most) until the followed stderr is closed: a process that exited
    /// has then had all its lines kept.
    fn settle(&self) {
        for _ in 0..50 {
            if self.ended.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether a kept line contains `needle`.
    fn has(&self, needle: &str) -> bool {
        self.lines
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains(needle))
    }

    /// The kept lines, or a note that there are none.
    fn tail(&self) -> String {
        let kept = self.lines.lock().expect("log");
        if kept.is_empty() {
            return "(no log lines kept)".into();
        }
        kept.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Every 20 ms until `find` finds something: `None` after `timeout`, or as soon as the
/// source `ended` without it. `ended` is read before each search, so that what came just
/// before the end is found.
fn poll<T>(timeout: Duration, ended: impl Fn() -> bool, find: impl Fn() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let ended = ended();
        if let Some(found) = find() {
            return Some(found);
        }
        if ended || Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CONNTRACE_ATTACH (`best`, `tracepoints`) runs the same scenarios on another attach path:
/// the VM kernel matrix runs them both ways and both must give the same verdicts.
pub fn attach_args() -> Vec<String> {
    std::env::var("CONNTRACE_ATTACH")
        .ok()
        .map(|mode| vec!["--attach".to_owned(), mode])
        .unwrap_or_default()
}

pub fn conntrace_bin() -> PathBuf {
    bin("CONNTRACE_BIN", "target/debug/conntrace")
}

impl Conntrace {
    /// Starts conntrace in the root namespace and waits for its `ready` line. Its log (WARN
    /// and above unless RUST_LOG says otherwise) goes to the test's stderr, and its last lines
    /// into a failure's message.
    pub fn start(args: &[&str]) -> Self {
        Self::start_logging(args, "conntrace=warn")
    }

    /// [`Conntrace::start`], logging every kernel event it reads too (TRACE, kept for a
    /// failure's message, not printed): for a scenario of a few connections, where a missing
    /// verdict must say which of the kernel's facts came.
    pub fn start_tracing_events(args: &[&str]) -> Self {
        Self::start_logging(args, "conntrace=warn,conntrace::run=trace")
    }

    /// [`Conntrace::start`] with `filter` as RUST_LOG (the environment's RUST_LOG wins).
    fn start_logging(args: &[&str], filter: &str) -> Self {
        let path = conntrace_bin();
        assert!(
            path.exists(),
            "{} not built: run `cargo xtask test`",
            path.display()
        );
        let mut command = Command::new(&path);
        command
            .arg("--json")
            .args(attach_args())
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| filter.into()),
            )
            .stderr(Stdio::piped());
        Self::spawn(command, "conntrace")
    }

    /// Starts `command`, which runs `conntrace --json` (e.g. `podman run IMAGE --json ...`),
    /// and waits for its `ready` line; [`Conntrace::stop`] sends SIGINT to the process it
    /// started (`podman run` passes it on to conntrace). Its stderr goes where `command`
    /// says (inherited unless set); piped, it is read as [`Conntrace::start`] says.
    pub fn spawn(mut command: Command, what: &str) -> Self {
        let mut process = Proc::spawn(command.stdout(Stdio::piped()), what);
        let stdout = process.child.stdout.take().expect("stdout");
        let log = Log::default();
        if let Some(stderr) = process.child.stderr.take() {
            log.follow(stderr);
        }
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
            process,
            lines,
            reader: Some(reader),
            log,
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

    /// Waits until a line matches `pred`, panicking after `timeout` or once conntrace's output
    /// ended without one.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Line) -> bool) -> Line {
        self.try_wait_for(timeout, pred).unwrap_or_else(|| {
            let why = if self.output_ended() {
                self.log.settle();
                "conntrace's output ended (it exited, or printed a line that is not JSON) without a matching line".to_owned()
            } else {
                format!("no matching conntrace line within {timeout:?}")
            };
            panic!(
                "{why}; got:\n{}\nits log:\n{}",
                self.dump(),
                self.log.tail()
            )
        })
    }

    /// Waits until conntrace's log (kept when [`Conntrace::start`] piped it: WARN and above
    /// unless RUST_LOG says otherwise, the last [`LOG_LINES`] lines) has a line containing
    /// `needle`: false after `timeout`, or as soon as the log ended without one.
    pub fn wait_for_log(&self, timeout: Duration, needle: &str) -> bool {
        let ended = || self.log.ended.load(std::sync::atomic::Ordering::Acquire);
        poll(timeout, ended, || self.log.has(needle).then_some(())).is_some()
    }

    /// Whether conntrace's stdout is closed: no line will come.
    fn output_ended(&self) -> bool {
        self.reader
            .as_ref()
            .is_none_or(std::thread::JoinHandle::is_finished)
    }

    /// Waits until a line matches `pred`; `None` after `timeout`, or as soon as conntrace's
    /// output ended without one (a conntrace that exited on a usage error is not waited for).
    pub fn try_wait_for(&self, timeout: Duration, pred: impl Fn(&Line) -> bool) -> Option<Line> {
        poll(
            timeout,
            || self.output_ended(),
            || {
                self.lines
                    .lock()
                    .expect("lines")
                    .iter()
                    .find(|l| pred(l))
                    .cloned()
            },
        )
    }

    /// Waits ([`VERDICT_WAIT`] at most) for a verdict in namespace `netns`, then stops
    /// conntrace; without one it panics, saying whether conntrace printed it at exit.
    pub fn stop_after_verdict_in(self, netns: u64) -> Vec<Value> {
        let in_netns = |v: &Value| v["event"] == "verdict" && v["netns"] == netns;
        let seen = self.try_wait_for(VERDICT_WAIT, |l| in_netns(&l.value));
        if seen.is_some() {
            return self.stop();
        }
        // Stopped, conntrace decides and prints what it still holds: whether the verdict was
        // late or never made tells two different failures apart.
        let log = self.log.clone();
        let values = self.stop();
        let lines: Vec<String> = values.iter().map(Value::to_string).collect();
        panic!(
            "no verdict in netns {netns} within {VERDICT_WAIT:?}; {} at exit; conntrace printed:\n{}\nits log:\n{}",
            if values.iter().any(in_netns) {
                "it came only"
            } else {
                "none either"
            },
            lines.join("\n"),
            log.tail()
        );
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

    /// The conntrace process id (for CPU and memory figures).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Stops conntrace with SIGINT and returns every line it printed, each validated against
    /// docs/events.schema.json.
    pub fn stop(mut self) -> Vec<Value> {
        self.process.signal(libc::SIGINT);
        let status = self
            .process
            .wait(Duration::from_secs(15), "conntrace after SIGINT");
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

/// The run's `summary` record.
pub fn summary_of(values: &[Value]) -> &Value {
    values
        .iter()
        .find(|v| v["event"] == "summary")
        .expect("a summary record")
}

/// Runs of the lifecycle program (`inet_sock_set_state`, either attach path) the kernel
/// skipped in the run, from its summary's `program_misses`: state changes conntrace never saw.
pub fn lifecycle_misses(summary: &Value) -> u64 {
    summary["program_misses"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(program, _)| program.contains("inet_sock_set_state"))
        .filter_map(|(_, n)| n.as_u64())
        .sum()
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
    if verdicts.len() != 1 {
        // Every verdict and drop of the run, by namespace: which end got what.
        let seen: Vec<String> = values
            .iter()
            .filter(|v| v["event"] == "verdict" || v["event"] == "drop")
            .map(|v| {
                format!(
                    "{} netns {} {} {}",
                    v["event"], v["netns"], v["side"], v["reason"]
                )
            })
            .collect();
        panic!(
            "want exactly one verdict in netns {netns}, got {}: {verdicts:?}; the run's verdicts and drops: {seen:?}",
            verdicts.len()
        );
    }
    verdicts.into_iter().next().expect("one verdict")
}

/// A verdict in short, `side outcome reason errno` (`-` when the errno is null), as the engine's
/// unit tests spell it: `client failed syn_timeout ETIMEDOUT`.
pub fn verdict_line(v: &Value) -> String {
    let text = |f: &str| v[f].as_str().unwrap_or("-").to_owned();
    format!(
        "{} {} {} {}",
        text("side"),
        text("outcome"),
        text("reason"),
        text("errno")
    )
}

/// The verdicts in namespace `netns`, each as [`verdict_line`], in the order printed.
pub fn verdict_lines_in(values: &[Value], netns: u64) -> Vec<String> {
    verdicts_in(values, netns)
        .iter()
        .map(verdict_line)
        .collect()
}

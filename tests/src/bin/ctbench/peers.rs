//! The peers conntrace is compared with: bpftrace with a light tracepoint script, bpftrace on
//! conntrace's own hooks (bpftrace.rs), bcc's `tcpstates`, and the empty programs of the
//! `floor` modes (floor.rs); which of them run here, and what they need before the rounds.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use conntrace_tests::{PORT, Proc};
use serde_json::Value;

use super::{bpftrace, floor::Floor};

/// The `programs` of conntrace's `ready` record (`--port PORT`, and `--without` as the traced
/// phases have it): conntrace is started once for it, and stopped.
fn conntrace_programs(without: Option<&str>) -> Vec<Value> {
    let ct = crate::start_conntrace(&PORT.to_string(), without);
    let ready = ct.ready();
    ct.stop();
    ready["programs"].as_array().cloned().unwrap_or_default()
}

/// bpftrace with a tracepoint-only script counting the same lifecycle, reset and drop events.
fn bpftrace_script() -> String {
    format!(
        "tracepoint:sock:inet_sock_set_state /args->protocol == 6 && (args->sport == {PORT} || args->dport == {PORT})/ {{ @states[args->newstate] = count(); }}\n\
         tracepoint:tcp:tcp_receive_reset /args->sport == {PORT} || args->dport == {PORT}/ {{ @rst = count(); }}\n\
         tracepoint:skb:kfree_skb /args->protocol == 0x0800/ {{ @drops[args->reason] = count(); }}\n"
    )
}

/// The bcc peer: `tcpstates` (Debian's bpfcc-tools) on the churned port. bcc compiles its
/// program at start with the kernel's headers; where they are missing it cannot run.
const TCPSTATES: &str = "/usr/sbin/tcpstates-bpfcc";

/// Starts bcc's tcpstates and waits for its header line (compiled and attached), or returns
/// why it does not run here.
pub fn start_tcpstates() -> Result<Proc, String> {
    use std::io::{BufRead, BufReader};
    let mut tcpstates = Proc::from(
        Command::new(TCPSTATES)
            .args(["-L", &PORT.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{TCPSTATES}: {e} (package bpfcc-tools)"))?,
    );
    let stdout = tcpstates.child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    // tcpstates' header starts with SKADDR; bcc prints its errors on stdout or stderr.
    match lines.next() {
        Some(Ok(header)) if header.starts_with("SKADDR") => {
            // Keep reading, so that tcpstates never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            Ok(tcpstates)
        }
        first => {
            tcpstates.kill();
            let mut err = String::new();
            if let Some(mut e) = tcpstates.child.stderr.take() {
                std::io::Read::read_to_string(&mut e, &mut err).ok();
            }
            let first = first.and_then(Result::ok).unwrap_or_default();
            let reason = std::iter::once(first.as_str())
                .chain(err.lines())
                .find(|l| l.contains("Unable") || l.contains("rror"))
                .unwrap_or("exited before attaching")
                .trim()
                .to_owned();
            Err(reason)
        }
    }
}

pub fn start_bpftrace() -> Proc {
    let bpftrace = Proc::spawn(
        Command::new("bpftrace")
            .args(["-e", &bpftrace_script()])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "bpftrace",
    );
    std::thread::sleep(Duration::from_secs(3));
    bpftrace
}

/// What the peer modes need, prepared once before the rounds: the `bpftrace-hooks` script
/// and the empty programs of the `floor` modes, each where it runs here.
#[derive(Default)]
pub struct Peers {
    pub hooks_script: Option<String>,
    pub floor: Option<Floor>,
}

/// Peer modes that do not run here, and why (one line, printed at the end of the bench).
pub struct Absent {
    pub modes: &'static [&'static str],
    pub line: String,
}

impl Absent {
    fn new(modes: &'static [&'static str], line: String) -> Self {
        Self { modes, line }
    }
}

/// The modes to compare (bpftrace, bpftrace on conntrace's hooks, bcc's tcpstates and the
/// empty-program floors, where they run), the peers left out and why, and what the peers
/// need.
pub fn modes(without: Option<&str>) -> (Vec<&'static str>, Vec<Absent>, Peers) {
    let mut modes = vec!["untraced", "traced", "unrelated"];
    let mut absent = Vec::new();
    let mut peers = Peers::default();
    // Both peers on conntrace's hooks follow what one start of it lists.
    let programs = conntrace_programs(without);
    if Command::new("bpftrace").arg("--version").output().is_ok() {
        modes.push("bpftrace");
        match bpftrace::prepare(&programs) {
            Ok(script) => {
                modes.push("bpftrace-hooks");
                peers.hooks_script = Some(script);
            }
            Err(why) => absent.push(Absent::new(
                &["bpftrace-hooks"],
                format!("bpftrace-hooks: not compared: {why}"),
            )),
        }
    } else {
        absent.push(Absent::new(
            &["bpftrace", "bpftrace-hooks"],
            "bpftrace: not installed, not compared".to_owned(),
        ));
    }
    match start_tcpstates() {
        Ok(probe) => {
            drop(probe);
            modes.push("tcpstates");
        }
        Err(why) => absent.push(Absent::new(
            &["tcpstates"],
            format!("bcc tcpstates: does not run here: {why}"),
        )),
    }
    match Floor::prepare(&programs) {
        Ok(floor) => {
            modes.extend(["floor", "floor-unrelated"]);
            peers.floor = Some(floor);
        }
        Err(why) => absent.push(Absent::new(
            &["floor", "floor-unrelated"],
            format!("floor: not measured: {why}"),
        )),
    }
    (modes, absent, peers)
}

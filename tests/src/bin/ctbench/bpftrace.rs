//! Running bpftrace for the `bpftrace-hooks` peer: the script from conntrace's hooks (hooks.rs),
//! each probe tried alone first, a hook bpftrace refuses left out with bpftrace's reason, and a
//! start that returns only once bpftrace has attached every probe.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use conntrace_tests::{PORT, Proc};

use super::hooks::{Hook, classic_twin, plan, script};

/// Spawns bpftrace on `script` with piped output; lines of stdout and stderr arrive on the
/// channel (each reader thread runs until bpftrace exits, so it never blocks on a full pipe).
fn spawn(script: &str) -> Result<(Proc, mpsc::Receiver<String>), String> {
    let mut proc = Proc::from(
        Command::new("bpftrace")
            .args(["-e", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("bpftrace: {e}"))?,
    );
    let (tx, rx) = mpsc::channel();
    let out: Box<dyn Read + Send> = Box::new(proc.child.stdout.take().expect("piped stdout"));
    let err: Box<dyn Read + Send> = Box::new(proc.child.stderr.take().expect("piped stderr"));
    for pipe in [out, err] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                tx.send(line).ok();
            }
        });
    }
    Ok((proc, rx))
}

/// bpftrace's reason in `lines`: its first error, else its first warning (it skips a probe it
/// cannot attach with only a warning), leaving out the RLIMIT_MEMLOCK notice it prints on
/// kernels that no longer charge BPF memory to it.
fn reason(lines: &[String], fallback: String) -> String {
    let told = |l: &&String| !l.contains("RLIMIT_MEMLOCK");
    let first = |what: &[&str]| {
        lines
            .iter()
            .filter(told)
            .find(|l| what.iter().any(|w| l.contains(w)))
    };
    first(&["ERROR", "FATAL"])
        .or_else(|| first(&["WARNING"]))
        .map_or(fallback, |l| l.trim().to_owned())
}

/// Why bpftrace cannot attach this one probe, or `None` when it can: the probe alone must
/// start as [`start`] requires.
pub fn refused(probe: &str) -> Option<String> {
    start(&format!("{probe}\n")).err()
}

/// Every line still to come from an exited bpftrace (its readers end at end of file), waiting
/// a second at most.
fn rest(rx: &mpsc::Receiver<String>) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        lines.push(line);
    }
    lines
}

/// A bpftrace attached to the hooks; its lines wait on the channel until [`Running::hits`].
pub struct Running {
    proc: Proc,
    lines: mpsc::Receiver<String>,
}

/// Starts bpftrace on `script` and waits until it has attached: its `Attaching N probes` line,
/// and still running a moment later (a failed attach ends it with an error).
pub fn start(script: &str) -> Result<Running, String> {
    let probes = script.lines().filter(|l| !l.trim().is_empty()).count();
    let (mut proc, rx) = spawn(script)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let fail = |proc: &mut Proc, seen: &mut Vec<String>, fallback: String| {
        proc.kill();
        seen.extend(rest(&rx));
        Err(reason(seen, fallback))
    };
    let attaching = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with("Attach") => break line,
            Ok(line) => seen.push(line),
            Err(_) => {
                return fail(&mut proc, &mut seen, "no `Attaching N probes` line".into());
            }
        }
    };
    // `Attaching 3 probes...`: bpftrace leaves out, with a warning, a probe it finds it cannot
    // attach (a kprobe on a function that is not traceable).
    let n: Option<usize> = attaching
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok());
    if n != Some(probes) {
        let fallback = format!("bpftrace: `{attaching}` for {probes} probes");
        return fail(&mut proc, &mut seen, fallback);
    }
    std::thread::sleep(Duration::from_millis(500));
    seen.extend(rx.try_iter());
    if let Ok(Some(status)) = proc.child.try_wait() {
        return fail(
            &mut proc,
            &mut seen,
            format!("bpftrace exited with {status}"),
        );
    }
    // An attach that fails at run time is skipped with a warning, and bpftrace goes on.
    if let Some(skipped) = seen.iter().find(|l| l.contains("skipping")) {
        let skipped = skipped.clone();
        return fail(&mut proc, &mut seen, skipped);
    }
    Ok(Running { proc, lines: rx })
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Stops bpftrace with SIGINT and returns what it counted, per probe, as it prints its
    /// `@hits[PROBE]: N` lines at exit.
    pub fn hits(mut self) -> Vec<(String, u64)> {
        self.proc.signal(libc::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.proc.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.proc.kill();
        rest(&self.lines)
            .iter()
            .filter_map(|l| {
                let (probe, n) = l.strip_prefix("@hits[")?.split_once("]: ")?;
                Some((probe.to_owned(), n.trim().parse().ok()?))
            })
            .collect()
    }
}

/// Builds the script from the hooks of conntrace's `ready` record (its `programs`), from
/// the hooks bpftrace can attach (a raw tracepoint it refuses on the classic tracepoint of the
/// same name). Prints the probes once, and a line for each hook left out or moved.
pub fn prepare(programs: &[serde_json::Value]) -> Result<String, String> {
    let attaches: Vec<String> = programs
        .iter()
        .filter_map(|p| p["attach"].as_str().map(str::to_owned))
        .collect();
    let (hooks, mut left_out) = plan(&attaches);
    let version = Command::new("bpftrace")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut twins = Vec::new();
    let hooks: Vec<Hook> = hooks
        .into_iter()
        .filter_map(|h| {
            let Some(why) = refused(&h.probe(PORT)) else {
                return Some(h);
            };
            let why = format!("{}: {version} refuses it: {why}", h.attach);
            match classic_twin(&h).filter(|t| refused(&t.probe(PORT)).is_none()) {
                Some(twin) => {
                    twins.push(format!(
                        "{why}; counted on {} instead (the same site; the record is built per run)",
                        twin.kind.point()
                    ));
                    Some(twin)
                }
                None => {
                    left_out.push(why);
                    None
                }
            }
        })
        .collect();
    for line in &twins {
        println!("bpftrace-hooks: {line}");
    }
    for line in &left_out {
        println!("bpftrace-hooks: left out {line}");
    }
    if hooks.is_empty() {
        return Err("bpftrace attaches none of conntrace's hooks".to_owned());
    }
    let script = script(&hooks, PORT);
    println!(
        "bpftrace-hooks: {} probes, on {} of the {} hooks conntrace attached:",
        hooks.len(),
        hooks.len(),
        attaches.len()
    );
    for line in script.lines() {
        println!("  {line}");
    }
    // Every probe attached alone; make sure they also do together.
    drop(start(&script)?);
    Ok(script)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_real_error_is_the_reason() {
        let lines = [
            "ERROR: Unknown error -1: couldn't set RLIMIT_MEMLOCK for bpftrace.".to_owned(),
            "stdin:1:1-19: WARNING: tcp_connect is not traceable".to_owned(),
            "stdin:1:1-26: ERROR: kfunc/kretfunc not available for your kernel version.".to_owned(),
        ];
        assert_eq!(
            reason(&lines, "exited".into()),
            "stdin:1:1-26: ERROR: kfunc/kretfunc not available for your kernel version."
        );
        assert_eq!(
            reason(&lines[..2], "exited".into()),
            "stdin:1:1-19: WARNING: tcp_connect is not traceable"
        );
        assert_eq!(reason(&lines[..1], "exited".into()), "exited");
    }
}

//! Reads what the guest left in its output share and prints the per-kernel table.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;

#[derive(Clone)]
pub enum Outcome {
    Passed,
    /// Passed, but printed a line containing "skip": the reason.
    Skipped(String),
    /// The assertion (libtest's captured output), or why the test never finished.
    Failed(String),
}

pub struct TestResult {
    pub binary: String,
    pub name: String,
    pub outcome: Outcome,
}

/// The attach plan from conntrace's `ready` line.
pub struct Attach {
    /// capability -> attach path (tracepoint, fentry, kprobe, ...).
    pub paths: BTreeMap<String, String>,
    /// "capability (program): reason" for every program that could not attach.
    pub unavailable: Vec<String>,
    /// The programs the kernel refused to load for another reason than a missing permission
    /// or feature (EPERM: fentry refused by the host): the verifier's refusals, which are
    /// conntrace's own regressions.
    pub refused: Vec<String>,
    /// (program, instructions the verifier walked to accept it), the most first.
    pub verified: Vec<(String, u64)>,
    pub features: String,
}

/// One kernel in one attach mode.
pub struct KernelReport {
    pub label: String,
    /// conntrace's `--attach` mode.
    pub mode: String,
    pub release: String,
    /// The mode's probe and tests in the guest.
    pub elapsed: Duration,
    /// The whole boot (both modes, when both ran).
    pub boot_seconds: u64,
    pub tests: Vec<TestResult>,
    pub attach: Result<Attach, String>,
    /// Why the run as a whole failed (timeout, no completion, infrastructure).
    pub problems: Vec<String>,
    pub log: Option<PathBuf>,
    pub out: Option<PathBuf>,
}

impl KernelReport {
    pub fn error(label: &str, elapsed: Duration, problem: String) -> Self {
        Self {
            label: label.to_owned(),
            mode: String::new(),
            release: String::new(),
            elapsed,
            boot_seconds: elapsed.as_secs(),
            tests: Vec::new(),
            attach: Err("not run".into()),
            problems: vec![problem],
            log: None,
            out: None,
        }
    }

    fn count(&self, pred: impl Fn(&Outcome) -> bool) -> usize {
        self.tests.iter().filter(|t| pred(&t.outcome)).count()
    }

    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Failed(_)))
    }

    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.failed() == 0
    }

    /// Results of `mode` for `plan` (binary, tests) from the output share `out`, whose
    /// files are named `BINARY.MODE.json` (tests/vm/guest.sh).
    pub fn read(label: &str, mode: &str, plan: Vec<(String, Vec<String>)>, out: &Path) -> Self {
        let text = |name: String| fs::read_to_string(out.join(name)).map(|s| s.trim().to_owned());
        let seconds = |name: String| text(name).ok().and_then(|s| s.parse::<u64>().ok());
        let mut elapsed = seconds(format!("ready.{mode}.seconds")).unwrap_or(0);
        let mut tests = Vec::new();
        for (binary, names) in plan {
            let key = format!("{binary}.{mode}");
            let results = libtest_results(&out.join(format!("{key}.json")));
            let rc =
                text(format!("{key}.rc")).unwrap_or_else(|_| "none (not run to the end)".into());
            elapsed += seconds(format!("{key}.seconds")).unwrap_or(0);
            for name in names {
                let outcome = match results.get(&name) {
                    Some(o) => o.clone(),
                    None => Outcome::Failed(format!(
                        "did not finish: {binary} exit code {rc}{}",
                        if rc == "124" { " (guest timeout)" } else { "" }
                    )),
                };
                tests.push(TestResult {
                    binary: binary.clone(),
                    name,
                    outcome,
                });
            }
        }
        let attach = read_ready(out, mode);
        // A program this kernel's verifier refuses fails the run even when every test
        // passes: the capability fell back to a worse path, or went away. So does one it
        // accepts near its limit: the next change to it would be refused there.
        let problems = attach.as_ref().map_or_else(
            |_| Vec::new(),
            |a| {
                let refused = a
                    .refused
                    .iter()
                    .map(|r| format!("the kernel refused to load {r}"));
                let near = a
                    .verified
                    .iter()
                    .filter(|(_, n)| *n >= NEAR_LIMIT)
                    .map(|(p, n)| {
                        format!("the verifier walked {n} instructions to accept {p}, near its limit of 1,000,000")
                    });
                refused.chain(near).collect()
            },
        );
        Self {
            label: label.to_owned(),
            mode: mode.to_owned(),
            release: text("kernel".into()).unwrap_or_default(),
            elapsed: Duration::from_secs(elapsed),
            boot_seconds: 0,
            tests,
            attach,
            problems,
            log: None,
            out: Some(out.to_owned()),
        }
    }
}

/// libtest's JSON events (`--format json --show-output`) by test name.
fn libtest_results(path: &Path) -> BTreeMap<String, Outcome> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut results = BTreeMap::new();
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        if v["type"] != "test" {
            continue;
        }
        let name = v["name"].as_str().unwrap_or_default().to_owned();
        let stdout = v["stdout"].as_str().unwrap_or_default();
        let outcome = match v["event"].as_str() {
            Some("ok") => match stdout.lines().find(|l| l.to_lowercase().contains("skip")) {
                Some(line) => Outcome::Skipped(line.trim().to_owned()),
                None => Outcome::Passed,
            },
            Some("ignored") => Outcome::Skipped("ignored".into()),
            Some("failed") => Outcome::Failed(stdout.trim().to_owned()),
            _ => continue,
        };
        results.insert(name, outcome);
    }
    results
}

/// The `ready` line of the guest's conntrace probe.
fn read_ready(out: &Path, mode: &str) -> Result<Attach, String> {
    let text = fs::read_to_string(out.join(format!("ready.{mode}.jsonl"))).unwrap_or_default();
    let ready = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "ready");
    let Some(ready) = ready else {
        let rc = fs::read_to_string(out.join(format!("ready.{mode}.rc"))).unwrap_or_default();
        let stderr =
            fs::read_to_string(out.join(format!("ready.{mode}.stderr"))).unwrap_or_default();
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        return Err(format!(
            "conntrace printed no ready line (exit {}): {}",
            rc.trim(),
            last.unwrap_or("no output")
        ));
    };
    let paths = ready["attach_paths"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("?").to_owned()))
                .collect()
        })
        .unwrap_or_default();
    // Every program that could not attach, and among them those the kernel refused.
    let (mut unavailable, mut refused) = (Vec::new(), Vec::new());
    for u in ready["unavailable"].as_array().into_iter().flatten() {
        let reason = u["reason"].as_str().unwrap_or_default();
        let short = short_reason(reason);
        if refused_by_verifier(reason) {
            refused.push(format!("{}: {short}", u["name"].as_str().unwrap_or("?")));
        }
        unavailable.push(format!(
            "{} ({}): {short}",
            u["capability"].as_str().unwrap_or("?"),
            u["attach"].as_str().unwrap_or("?"),
        ));
    }
    let mut verified: Vec<(String, u64)> = ready["programs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p["name"].as_str()?.to_owned(),
                p["verified_insns"].as_u64()?,
            ))
        })
        .collect();
    verified.sort_by_key(|v| std::cmp::Reverse(v.1));
    let features = ready["kernel_features"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    Ok(Attach {
        paths,
        unavailable,
        refused,
        verified,
        features,
    })
}

/// The most instructions the kernel's verifier walks before it refuses a program.
const VERIFIER_LIMIT: u64 = 1_000_000;

/// Instructions walked by the verifier past which a program it accepted fails the run: three
/// quarters of its limit.
const NEAR_LIMIT: u64 = VERIFIER_LIMIT / 4 * 3;

/// The verifier's work per program, against its limit: "kfree_skb 812,345 (81 %), ...".
fn verified_line(verified: &[(String, u64)]) -> String {
    verified
        .iter()
        .map(|(name, n)| {
            let digits = n.to_string();
            let groups: Vec<&str> = digits
                .as_bytes()
                .rchunks(3)
                .rev()
                .map(|c| std::str::from_utf8(c).unwrap_or_default())
                .collect();
            format!(
                "{name} {} ({} %)",
                groups.join(","),
                n * 100 / VERIFIER_LIMIT
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
        + " of 1,000,000 instructions"
}

/// Whether an unavailable program's reason is a load the kernel refused for what the program
/// does (EINVAL, EACCES, E2BIG, ...: the verifier), not for a permission (EPERM) it lacks.
fn refused_by_verifier(reason: &str) -> bool {
    reason.contains("BPF_PROG_LOAD") && !reason.contains("(os error 1)")
}

/// A load error without the verifier's log, but with the log's verdict (its last line).
fn short_reason(reason: &str) -> String {
    match reason.split_once("Verifier output:") {
        Some((head, log)) => {
            let last = log.lines().rev().find(|l| !l.trim().is_empty());
            format!("{} [verifier: {}]", head.trim(), last.unwrap_or("").trim())
        }
        None => reason.lines().next().unwrap_or("").to_owned(),
    }
}

impl Attach {
    /// "tracepoint×9; unavailable: drops"
    fn summary(&self) -> String {
        let mut by_path = BTreeMap::<&str, usize>::new();
        for p in self.paths.values() {
            *by_path.entry(p).or_default() += 1;
        }
        let mut s = by_path
            .iter()
            .map(|(p, n)| format!("{p}×{n}"))
            .collect::<Vec<_>>()
            .join(" ");
        if !self.unavailable.is_empty() {
            let caps: BTreeMap<&str, ()> = self
                .unavailable
                .iter()
                .filter_map(|u| u.split_once(' ').map(|(c, _)| (c, ())))
                .collect();
            let caps: Vec<&str> = caps.into_keys().collect();
            s.push_str(&format!("; unavailable: {}", caps.join(",")));
        }
        s
    }
}

/// Prints the table (kernel | --attach | passed | failed | skipped | seconds | attach paths),
/// then the details: attach paths per capability, skips, failures, problems, where the logs
/// are. `seconds` is the mode's conntrace probe and tests in the guest, without the boot.
pub fn print(reports: &[KernelReport]) {
    let rows: Vec<[String; 7]> = reports
        .iter()
        .map(|r| {
            let kernel = if r.release.is_empty() {
                r.label.clone()
            } else {
                format!("{} ({})", r.label, r.release)
            };
            let attach = match &r.attach {
                Ok(a) => a.summary(),
                Err(e) => format!("? ({})", e.chars().take(60).collect::<String>()),
            };
            let failed = r.failed().to_string() + if r.problems.is_empty() { "" } else { "+run" };
            [
                kernel,
                r.mode.clone(),
                r.count(|o| matches!(o, Outcome::Passed)).to_string(),
                failed,
                r.count(|o| matches!(o, Outcome::Skipped(_))).to_string(),
                r.elapsed.as_secs().to_string(),
                attach,
            ]
        })
        .collect();
    let header = [
        "kernel",
        "--attach",
        "passed",
        "failed",
        "skipped",
        "seconds",
        "attach paths",
    ];
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("| {} |", padded.join(" | "));
    };
    println!();
    println!("vm-test results");
    line(&header.map(String::from));
    line(&widths.map(|w| "-".repeat(w)));
    for row in &rows {
        line(row);
    }
    for r in reports {
        println!();
        println!(
            "{} ({}) --attach {}: {} s (the boot: {} s)",
            r.label,
            r.release,
            r.mode,
            r.elapsed.as_secs(),
            r.boot_seconds
        );
        match &r.attach {
            Ok(a) => {
                let paths: Vec<String> = a.paths.iter().map(|(c, p)| format!("{c}={p}")).collect();
                println!("  attach: {}", paths.join(" "));
                println!("  kernel features: {}", a.features);
                if !a.verified.is_empty() {
                    println!("  verifier: {}", verified_line(&a.verified));
                }
                for u in &a.unavailable {
                    println!("  unavailable: {u}");
                }
            }
            Err(e) => println!("  attach plan unknown: {e}"),
        }
        for t in &r.tests {
            match &t.outcome {
                Outcome::Passed => println!("  ok      {}::{}", t.binary, t.name),
                Outcome::Skipped(why) => println!("  skipped {}::{}: {why}", t.binary, t.name),
                Outcome::Failed(why) => {
                    println!("  FAILED  {}::{}", t.binary, t.name);
                    let lines: Vec<&str> = why.lines().collect();
                    for l in lines.iter().take(30) {
                        println!("      {l}");
                    }
                    if lines.len() > 30 {
                        println!("      ... ({} more lines)", lines.len() - 30);
                    }
                }
            }
        }
        for p in &r.problems {
            println!("  PROBLEM: {p}");
        }
        if let Some(out) = &r.out {
            println!(
                "  results: {} (BINARY.MODE.json and .stderr, ready.MODE.jsonl, dmesg)",
                out.display()
            );
        }
        if let Some(log) = &r.log {
            println!("  console: {}", log.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_events_become_passed_skipped_and_failed() {
        let dir = std::env::temp_dir().join(format!("xtask-report-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.json");
        fs::write(
            &path,
            [
                r#"{ "type": "suite", "event": "started", "test_count": 4 }"#,
                r#"{ "type": "test", "event": "started", "name": "a" }"#,
                r#"{ "type": "test", "name": "a", "event": "ok" }"#,
                r#"{ "type": "test", "name": "b", "event": "ok", "stdout": "MEASURED x\nSKIP: no hook\n" }"#,
                r#"{ "type": "test", "name": "c", "event": "failed", "stdout": "panicked at x" }"#,
                r#"{ "type": "test", "name": "d", "event": "ignored" }"#,
            ]
            .join("\n"),
        )
        .unwrap();
        let r = libtest_results(&path);
        fs::remove_dir_all(&dir).ok();
        assert!(matches!(r["a"], Outcome::Passed));
        assert!(matches!(&r["b"], Outcome::Skipped(s) if s == "SKIP: no hook"));
        assert!(matches!(&r["c"], Outcome::Failed(s) if s == "panicked at x"));
        assert!(matches!(r["d"], Outcome::Skipped(_)));
    }

    #[test]
    fn verifier_refusals_are_told_from_missing_permissions() {
        assert!(refused_by_verifier(
            "bpf(BPF_PROG_LOAD) tp_btf:kfree_skb: the BPF_PROG_LOAD syscall returned Permission denied (os error 13). Verifier output: R2 pointer |= pointer prohibited"
        ));
        assert!(refused_by_verifier(
            "bpf(BPF_PROG_LOAD) tracepoint:tcp:tcp_retransmit_skb: the BPF_PROG_LOAD syscall returned Argument list too long (os error 7)."
        ));
        assert!(!refused_by_verifier(
            "bpf(BPF_PROG_LOAD) fentry:__inet_accept: the BPF_PROG_LOAD syscall returned Operation not permitted (os error 1)."
        ));
        assert!(!refused_by_verifier("left out with --without"));
    }

    #[test]
    fn the_verifiers_work_is_grouped_and_a_share_of_its_limit() {
        let v = [("kfree_skb".to_owned(), 812_345), ("iter".to_owned(), 97)];
        assert_eq!(
            verified_line(&v),
            "kfree_skb 812,345 (81 %), iter 97 (0 %) of 1,000,000 instructions"
        );
    }

    #[test]
    fn a_load_error_keeps_the_verifiers_last_line_only() {
        let reason = "bpf(BPF_PROG_LOAD): too long. Verifier output: 0: r1 = 0\n1: exit\nprocessed 1000001 insns (limit 1000000)\n";
        assert_eq!(
            short_reason(reason),
            "bpf(BPF_PROG_LOAD): too long. [verifier: processed 1000001 insns (limit 1000000)]"
        );
    }
}

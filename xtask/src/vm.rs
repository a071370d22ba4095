//! `cargo xtask vm-test`: the root-only scenarios (`conntrace-tests`) under other kernels,
//! booted in QEMU with software emulation (TCG). docs/kernels.md describes it.
//!
//! The host builds the tests, fetches Debian's kernel packages with apt (unpacked under
//! `target/vm/kernels/`, nothing installed), packs a busybox initramfs (`tests/vm/init`) with
//! the few modules that mount the host's root file system read-only over 9p, and boots each
//! kernel with it. The guest runs `tests/vm/guest.sh` chrooted into that root, with the
//! kernel's own modules bound at `/lib/modules/<release>`, and leaves libtest's JSON results
//! in a writable 9p share (`target/vm/run-<kernel>/out`), which [`report`] reads.

mod kernel;
mod paths;
mod report;

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

pub use kernel::Series;
use kernel::{Kernel, fetch_kernel, initramfs};

use crate::{cargo, run, workspace_root};

/// Debian packages the VM runner needs: the emulator, a static busybox for the initramfs,
/// and kmod/xz/zstd to index and unpack the kernels' modules.
pub const VM_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "xz-utils",
    "zstd",
];

/// Integration test executables that need the host's container storage and daemons (Podman's
/// images, containerd): they run on the host only, not in the guests. In a guest, on its 9p
/// root under a tmpfs overlay, `podman system service` never opened its socket and containerd's
/// overlay mounts failed (EINVAL): environment, not kernel, failures.
const HOST_ONLY: &[&str] = &["image", "containers"];

/// The bounded subset `vm-test` runs without `--full` (and `cargo xtask test` on 6.12): one
/// scenario for each main failure class, exact test names.
pub const SUBSET: &[&str] = &[
    // scenarios.rs: connection refused, on both sides.
    "nothing_listening_is_refused_on_both_sides",
    // firewall.rs: a DROP rule named by hook and rule, and a REJECT with tcp-reset.
    "server_input_drop_names_the_hook_and_the_rule",
    "reject_with_tcp_reset_fails_every_connect_at_once",
    // stalls.rs: the lost SYN-cookie ACK (the client stalls without a greeting), cookies that
    // validate (a child's tuple is whole only at ESTABLISHED on these kernels), and a stall
    // that resolves when the greeting comes late (the first-data capability).
    "a_lost_cookie_ack_leaves_the_client_waiting_for_a_greeting",
    "cookies_that_validate_are_no_failure",
    "a_slow_greeting_is_stalled_then_resolved_with_the_stuck_time",
];

/// Bound on one test in the guest (TCG is slow: conntrace needs ~10 s to start, a scenario
/// 10-60 s; the bound is for hangs, not for the expected time).
const PER_TEST: Duration = Duration::from_secs(300);
/// Bound on boot and shutdown.
const FIXED: Duration = Duration::from_secs(120);
/// Bound on the conntrace probe (its `ready` line) of each attach mode.
const PROBE: Duration = Duration::from_secs(240);

/// conntrace's `--attach` modes (CONNTRACE_ATTACH for the tests).
pub const MODES: &[&str] = &["best", "tracepoints"];

/// `best`, `tracepoints` or `both`.
pub fn modes(attach: &str) -> anyhow::Result<Vec<&'static str>> {
    match attach {
        "both" => Ok(MODES.to_vec()),
        _ => match MODES.iter().find(|m| **m == attach) {
            Some(m) => Ok(vec![*m]),
            None => bail!("unknown --attach {attach:?}: use best, tracepoints or both"),
        },
    }
}

pub struct Options {
    pub kernels: Vec<Series>,
    /// `--attach` modes to run the tests in, one after the other in the same boot.
    pub modes: Vec<&'static str>,
    /// Every test instead of [`SUBSET`].
    pub full: bool,
    /// Test name filters (substrings, as libtest takes them); they replace the subset.
    pub filters: Vec<String>,
    /// No tests: only each mode's conntrace probe, which fails the run when the kernel
    /// refuses to load a program (a verifier regression on that kernel).
    pub probe_only: bool,
}

/// One integration test executable and the tests it will run.
struct TestExe {
    name: String,
    path: PathBuf,
    tests: Vec<String>,
}

fn vm_dir() -> PathBuf {
    workspace_root().join("target/vm")
}

/// Refuses a checkout the guest cannot see (beneath /proc, /sys, /run/netns, ...; see
/// [`paths`]), in one line that says why and what to do. Anywhere else works.
pub fn check_location() -> anyhow::Result<()> {
    paths::check(&workspace_root(), &vm_dir())
}

/// Builds everything, runs the selected tests under each kernel, prints the table; fails if
/// any kernel failed. The caller has run `setup` with [`VM_PACKAGES`].
pub fn vm_test(opts: &Options) -> anyhow::Result<()> {
    check_location()?;
    let _lock = RunLock::take()?;
    let (exes, helpers) = build()?;
    let plan = select(exes, opts)?;
    let count: usize = plan.iter().map(|e| e.tests.len()).sum();
    let what = if opts.probe_only {
        "none: load probe only"
    } else if !opts.filters.is_empty() {
        "filtered"
    } else if opts.full {
        "full"
    } else {
        "subset"
    };
    let kernels: Vec<&str> = opts.kernels.iter().map(|s| s.label).collect();
    eprintln!(
        "xtask: vm-test: {count} tests ({what}) on {}, --attach {}",
        kernels.join(", "),
        opts.modes.join(", ")
    );
    let mut reports = Vec::new();
    for series in &opts.kernels {
        let started = Instant::now();
        let outcome = fetch_kernel(series).and_then(|k| boot(&k, &opts.modes, &plan, &helpers));
        reports.extend(outcome.unwrap_or_else(|e| {
            eprintln!("xtask: vm-test {}: {e:#}", series.label);
            let why = format!("{e:#}");
            vec![report::KernelReport::error(
                series.label,
                started.elapsed(),
                why,
            )]
        }));
    }
    report::print(&reports);
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.ok())
        .map(|r| format!("{} {}", r.label, r.mode).trim().to_owned())
        .collect();
    if !failed.is_empty() {
        bail!("vm-test failed on {}", failed.join(", "));
    }
    Ok(())
}

/// Builds conntrace and the test executables; returns the integration test executables and
/// the other binaries they need beside them (conntrace, ctpeer, ...).
///
/// The guest runs the release conntrace: under emulation the debug build needs ~5 s after
/// its `ready` line before it handles the first event (it reads /proc/kallsyms then), longer
/// than the scenarios wait for a verdict; the release build needs ~0.4 s.
fn build() -> anyhow::Result<(Vec<TestExe>, Vec<PathBuf>)> {
    run(cargo().args(["build", "--release", "-p", "conntrace"]))?;
    let conntrace = crate::target_dir()?.join("release/conntrace");
    let mut cmd = cargo();
    cmd.args(["test", "-p", "conntrace-tests", "--tests", "--no-run"])
        .arg("--message-format=json-render-diagnostics")
        .env("CONNTRACE_BIN", &conntrace)
        .stderr(Stdio::inherit());
    eprintln!("xtask: {cmd:?}");
    let out = cmd.output().context("spawn cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed: {}", out.status);
    }
    let (mut exes, mut helpers) = (Vec::new(), vec![conntrace]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(path) = v["executable"].as_str() else {
            continue;
        };
        let kinds = &v["target"]["kind"];
        let name = v["target"]["name"].as_str().unwrap_or_default().to_owned();
        if kinds == &serde_json::json!(["test"]) {
            if HOST_ONLY.contains(&name.as_str()) {
                continue;
            }
            exes.push(TestExe {
                name,
                path: path.into(),
                tests: Vec::new(),
            });
        } else if kinds == &serde_json::json!(["bin"]) && v["profile"]["test"] == false {
            helpers.push(path.into());
        }
    }
    if exes.is_empty() {
        bail!("cargo built no integration test executables for conntrace-tests");
    }
    Ok((exes, helpers))
}

/// Lists each executable's tests (on the host: listing needs no privileges) and keeps the
/// selected ones.
fn select(exes: Vec<TestExe>, opts: &Options) -> anyhow::Result<Vec<TestExe>> {
    let mut plan = Vec::new();
    if opts.probe_only {
        return Ok(plan);
    }
    let mut found = BTreeSet::new();
    for mut exe in exes {
        let out = Command::new(&exe.path)
            .args(["--list", "--format", "terse"])
            .output()
            .with_context(|| format!("list the tests of {}", exe.path.display()))?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(test) = line.strip_suffix(": test") else {
                continue;
            };
            let wanted = if !opts.filters.is_empty() {
                opts.filters.iter().any(|f| test.contains(f.as_str()))
            } else {
                opts.full || SUBSET.contains(&test)
            };
            if wanted {
                found.insert(test.to_owned());
                exe.tests.push(test.to_owned());
            }
        }
        if !exe.tests.is_empty() {
            plan.push(exe);
        }
    }
    if opts.filters.is_empty() && !opts.full {
        let missing: Vec<&&str> = SUBSET.iter().filter(|t| !found.contains(**t)).collect();
        if !missing.is_empty() {
            bail!("the VM subset names tests that no longer exist: {missing:?} (xtask/src/vm.rs)");
        }
    }
    if plan.is_empty() {
        bail!("no test matches {:?}", opts.filters);
    }
    Ok(plan)
}

/// target/vm/lock, holding our pid: one vm-test at a time per checkout (they share the run
/// and kernel directories). A lock whose process is gone is taken over.
struct RunLock(PathBuf);

impl RunLock {
    fn take() -> anyhow::Result<Self> {
        let path = vm_dir().join("lock");
        fs::create_dir_all(vm_dir())?;
        for _ in 0..2 {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    write!(f, "{}", std::process::id())?;
                    return Ok(Self(path));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let pid = fs::read_to_string(&path).unwrap_or_default();
                    let pid = pid.trim();
                    if !pid.is_empty() && Path::new("/proc").join(pid).exists() {
                        bail!("another vm-test (pid {pid}) is running in this checkout");
                    }
                    fs::remove_file(&path).ok();
                }
                Err(e) => return Err(e).with_context(|| format!("create {}", path.display())),
            }
        }
        bail!("could not take {}", path.display())
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        fs::remove_file(&self.0).ok();
    }
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(path: PathBuf) -> anyhow::Result<Self> {
        if path.exists() {
            fs::remove_dir_all(&path).with_context(|| format!("remove {}", path.display()))?;
        }
        fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        fs::remove_dir_all(&self.0).ok();
    }
}

/// QEMU, killed on drop (timeouts, errors, panics).
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.0.kill().ok();
            self.0.wait().ok();
        }
    }
}

/// Hard-links (or copies) `from` into `dir`, so that a rebuild on the host during the run
/// does not change what the guest executes.
fn stage(from: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let to = dir.join(from.file_name().context("file name")?);
    if fs::hard_link(from, &to).is_err() {
        fs::copy(from, &to).with_context(|| format!("copy {}", from.display()))?;
    }
    Ok(to)
}

/// Writes the guest's plan (tests/vm/guest.sh): each mode's probe and tests, with the
/// executables staged in `bin`, fields separated by tabs (paths may hold spaces); returns the
/// bound on the whole run.
fn write_plan(
    out: &Path,
    bin: &Path,
    modes: &[&str],
    plan: &[TestExe],
    helpers: &[PathBuf],
) -> anyhow::Result<Duration> {
    let mut lines = Vec::new();
    for h in helpers {
        let staged = stage(h, bin)?;
        if h.file_name().is_some_and(|n| n == "conntrace") {
            lines.push(format!("env\tCONNTRACE_BIN\t{}", staged.display()));
            // Loading the programs takes up to a minute under emulation (tests/src/lib.rs).
            lines.push(format!(
                "env\tCONNTRACE_TEST_READY_SECS\t{}",
                PROBE.as_secs()
            ));
        }
    }
    let staged: Vec<PathBuf> = plan
        .iter()
        .map(|exe| stage(&exe.path, bin))
        .collect::<anyhow::Result<_>>()?;
    // RUST_LOG reaches the guest's conntrace (the probe's stderr keeps, at debug level, a
    // refused program's verifier log).
    if let Ok(log) = std::env::var("RUST_LOG") {
        lines.push(format!("env\tRUST_LOG\t{log}"));
    }
    let mut budget = FIXED;
    for mode in modes {
        lines.push(format!("env\tCONNTRACE_ATTACH\t{mode}"));
        lines.push(format!("probe\t{}\tready.{mode}", PROBE.as_secs()));
        budget += PROBE;
        for (exe, path) in plan.iter().zip(&staged) {
            let secs = 60 + PER_TEST.as_secs() * exe.tests.len() as u64;
            budget += Duration::from_secs(secs + 20);
            let (name, tests) = (&exe.name, exe.tests.join(" "));
            lines.push(format!(
                "test\t{name}.{mode}\t{}\t{secs}\t{tests}",
                path.display()
            ));
        }
    }
    fs::write(out.join("plan"), lines.join("\n") + "\n")?;
    Ok(budget)
}

/// The QEMU command line: TCG on 2 CPUs, the host root read-only and `out` writable over 9p.
/// The guest's paths are in the initramfs (`/paths`), not on the kernel command line.
fn qemu_command(kernel: &Kernel, image: &Path, out: &Path) -> anyhow::Result<Command> {
    // QEMU's option syntax: a comma in a value is written twice.
    let out = out.to_str().context("non-UTF-8 path")?.replace(',', ",,");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2"])
        .args(["-m", "2G", "-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(kernel.vmlinuz())
        .arg("-initrd")
        .arg(image)
        .arg("-virtfs")
        .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")
        .arg("-virtfs")
        .arg(format!(
            "local,path={out},mount_tag=ctout,security_model=none"
        ))
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(cmd)
}

/// The initramfs for `kernel`, with the guest's path list: the runner, the modules, and the
/// directories of the run that init must bind back over its fresh mounts ([`paths`]).
fn guest_image(kernel: &Kernel, run_dir: &Path) -> anyhow::Result<PathBuf> {
    let (root, modules) = (workspace_root(), kernel.modules());
    let keep = paths::rebinds(&[
        ("the checkout", &root),
        ("its target/vm", run_dir),
        ("the kernel's modules", &modules),
    ])?;
    let runner = root.canonicalize()?.join("tests/vm/guest.sh");
    let list = paths::guest_list(&runner, &modules.canonicalize()?, &keep);
    initramfs(kernel, run_dir, &list)
}

/// Boots `kernel` once and runs the plan in it, once for each attach mode; one report a mode.
fn boot(
    kernel: &Kernel,
    modes: &[&str],
    plan: &[TestExe],
    helpers: &[PathBuf],
) -> anyhow::Result<Vec<report::KernelReport>> {
    let run_dir = vm_dir()
        .canonicalize()?
        .join(format!("run-{}", kernel.label));
    if run_dir.exists() {
        fs::remove_dir_all(&run_dir)?;
    }
    let out = run_dir.join("out");
    fs::create_dir_all(&out)?;
    let bin = TempDir::new(run_dir.join("bin"))?;
    let budget = write_plan(&out, &bin.0, modes, plan, helpers)?;
    let image = guest_image(kernel, &run_dir)?;
    let mut cmd = qemu_command(kernel, &image, &out)?;
    let label = kernel.label;
    eprintln!(
        "xtask: booting {label} ({}) under TCG, at most {} s",
        kernel.package,
        budget.as_secs()
    );
    let started = Instant::now();
    let mut qemu = Qemu(cmd.spawn().context("spawn qemu-system-x86_64")?);
    let console_log = fs::File::create(run_dir.join("console.log"))?;
    let stdout = qemu.0.stdout.take().context("qemu stdout")?;
    let stderr = qemu.0.stderr.take().context("qemu stderr")?;
    let console = std::thread::spawn(move || echo(stdout, console_log, label));
    let errors = std::thread::spawn(move || {
        let lines = BufReader::new(stderr).lines().map_while(Result::ok);
        lines
            .inspect(|l| eprintln!("[{label} qemu] {l}"))
            .collect::<Vec<_>>()
    });
    let timed_out = loop {
        if let Some(status) = qemu.0.try_wait()? {
            if !status.success() {
                eprintln!("xtask: qemu exited with {status}");
            }
            break false;
        }
        if started.elapsed() > budget {
            eprintln!(
                "xtask: {label}: still running after {} s: killing QEMU",
                budget.as_secs()
            );
            qemu.0.kill().ok();
            qemu.0.wait().ok();
            break true;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let elapsed = started.elapsed();
    let finished = console.join().unwrap_or(false);
    let qemu_errors = errors.join().unwrap_or_default();
    drop(bin);
    let mut reports = Vec::new();
    for mode in modes {
        let names = plan.iter().map(|e| (e.name.clone(), e.tests.clone()));
        let mut r = report::KernelReport::read(label, mode, names.collect(), &out);
        r.release = kernel.release.clone();
        r.boot_seconds = elapsed.as_secs();
        r.log = Some(run_dir.join("console.log"));
        if timed_out {
            r.problems.push(format!(
                "timed out after {} s: QEMU killed",
                budget.as_secs()
            ));
        } else if !finished {
            let tail = qemu_errors.last().cloned().unwrap_or_default();
            r.problems.push(format!(
                "the guest did not finish its plan (see console.log) {tail}"
            ));
        }
        reports.push(r);
    }
    Ok(reports)
}

/// Echoes the guest console as `[label] line` and into `log`; true when the guest said it
/// completed its plan.
fn echo(stdout: impl std::io::Read, mut log: fs::File, label: &str) -> bool {
    let mut reader = BufReader::new(stdout);
    let mut finished = false;
    let mut buf = Vec::new();
    while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
        let raw = String::from_utf8_lossy(&buf);
        // Drop terminal escapes (SeaBIOS clears the screen) and carriage returns.
        let mut line = String::new();
        let mut chars = raw.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    while chars.next().is_some_and(|c| !c.is_ascii_alphabetic()) {}
                } else {
                    chars.next();
                }
            } else if !c.is_control() {
                line.push(c);
            }
        }
        buf.clear();
        writeln!(log, "{line}").ok();
        if line.trim().is_empty() {
            continue;
        }
        finished |= line.contains("guest: plan complete");
        println!("[{label}] {line}");
    }
    finished
}

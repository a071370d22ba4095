//! Developer tasks. `cargo xtask setup | run -- ARGS | test | bench | vm-test | image | images |
//! manifests`.
//!
//! `setup` installs, idempotently, everything building and testing conntrace needs on a Debian
//! machine: the eBPF toolchain (Debian's rustc-web with its library sources, LLVM 22,
//! bpf-linker), `protoc` (containerd's API is compiled from its protos), and the tools the
//! tests drive (iproute2, iptables, nftables, Podman, runc, containerd, mmdebstrap). It checks
//! before it installs, so it costs a second when everything is there.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod containers;
mod manifests;
mod vm;

#[derive(Parser)]
#[command(name = "xtask")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain and test tools (idempotent).
    Setup,
    /// Set up, build (release) and run conntrace as root with the given arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run every test: unit tests, the root-only integration scenarios,
    /// then the VM subset on Debian's 6.12 kernel (`vm-test --kernel 6.12`) and the load probe
    /// on 6.1 (`vm-test --kernel 6.1 --probe-only`).
    Test {
        /// Skip the VM stage (it is also skipped when a test filter is given).
        #[arg(long)]
        no_vm: bool,
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the integration scenarios inside other kernels (Debian 6.1, 6.12) under QEMU
    /// (software emulation); prints kernel | --attach | passed | failed | skipped | seconds |
    /// attach paths.
    /// See docs/kernels.md.
    VmTest {
        /// 6.1, 6.12 or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Run every test instead of the bounded subset.
        #[arg(long)]
        full: bool,
        /// Run no test: only conntrace's load probe in each attach mode, which fails when the
        /// kernel refuses a program.
        #[arg(long, conflicts_with = "full")]
        probe_only: bool,
        /// conntrace's attach mode for the tests: best, tracepoints or both (one after the
        /// other in the same boot).
        #[arg(long, default_value = "both")]
        attach: String,
        /// Test name filters (substrings); they replace the subset.
        #[arg(trailing_var_arg = true)]
        filters: Vec<String>,
    },
    /// Set up (with bpftrace, the peer it compares with), build release, and run the churn
    /// benchmark (`ctbench`): untraced, traced, unrelated port, bpftrace, bpftrace on
    /// conntrace's own hooks, an empty program on each of conntrace's hooks (`floor`,
    /// `floor-unrelated`); then each program's cost (`--bpf-stats`). Its last line is
    /// `bench: traced/untraced=R1 unrelated/untraced=R2 lost=N`.
    Bench {
        /// Arguments for ctbench (`cargo xtask bench -- --help` lists them): --rounds N (10),
        /// --phase-ms T (2000), --cpu N|all (0: every process on that CPU), --parallel K (1 on
        /// one CPU, else 2), --without CAP,..., --modes PEER,... (only these peers beside
        /// untraced, traced and unrelated), --compare-with BIN (only each program's cost here
        /// and in BIN, both tracing one churn at once, N runs), --programs-only (only each
        /// program's runs and ns per connection, tracing the churned port and another), --pooled
        /// (instead of the churn, persistent connections exchanging 64-byte requests: its last
        /// line is `bench pooled: traced/untraced=R1 unrelated/untraced=R2 lost=N`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build release, and build conntrace's container image with Podman from the
    /// Containerfile: `localhost/conntrace:VERSION` and `:latest`. Its base
    /// (`docker.io/library/debian:bookworm-slim`) is made locally with mmdebstrap when it is not
    /// in Podman's storage.
    Image,
    /// Build the tests' base image (`localhost/debian:bookworm-min`, mmdebstrap) into Podman
    /// and containerd's `k8s.io` namespace, unless present (starts containerd if needed).
    Images,
    /// Validate deploy/kubernetes/ offline against the Kubernetes schemas (kubernetes-validate).
    Manifests,
}

/// Debian packages: the eBPF toolchain (notes/environment.md) and the tools tests use.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libclang-22-dev",
    "libpolly-22-dev",
    "iproute2",
    "iptables",
    "nftables",
    // containerd-client compiles containerd's protos at build time.
    "protobuf-compiler",
];
/// The benchmark compares with bpftrace and bcc's tcpstates (which needs kernel headers to run).
const BENCH_PACKAGES: &[&str] = &["bpftrace", "bpfcc-tools"];

/// Only the tests need these: Prometheus scrapes the metrics endpoint, `setcap` runs
/// conntrace with file capabilities instead of root, `conntrack` fills a namespace's
/// connection-tracking table (ctnetlink).
const TEST_PACKAGES: &[&str] = &[
    "prometheus",
    "libcap2-bin",
    "bpftool",
    "hping3",
    "conntrack",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_TOOLCHAIN: &str = "system-bpf";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Runs a command (through sudo when root is needed and we are not root).
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("spawn {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn privileged(program: &str) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.arg(program);
        c
    }
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

fn missing_packages(packages: &[&'static str]) -> Vec<&'static str> {
    packages
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// Installs what is missing and nothing else: the toolchain and `extra` (test or bench tools).
fn setup(extra: &[&'static str]) -> anyhow::Result<()> {
    let mut packages = PACKAGES.to_vec();
    packages.extend_from_slice(extra);
    let missing = missing_packages(&packages);
    if !missing.is_empty() {
        run(privileged("apt-get").arg("update"))?;
        run(privileged("apt-get")
            // Wait for another apt to finish instead of failing at once.
            .args(["-o", "DPkg::Lock::Timeout=600"])
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !succeeds(Command::new("bpf-linker").arg("--version"))
        && !succeeds(Command::new(cargo_bin_dir().join("bpf-linker")).arg("--version"))
    {
        // bpf-linker links against the system LLVM 22; LLVM_PREFIX tells its build where it is.
        let path = format!(
            "{LLVM_PREFIX}/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        run(Command::new("cargo")
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("PATH", path))?;
    }
    if !succeeds(Command::new("rustup").args(["run", BPF_TOOLCHAIN, "rustc", "--version"])) {
        run(Command::new("rustup").args(["toolchain", "link", BPF_TOOLCHAIN, "/usr"]))?;
    }
    if !Path::new("/sys/kernel/tracing/events").is_dir()
        && !Path::new("/sys/kernel/debug/tracing/events").is_dir()
    {
        run(privileged("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))?;
    }
    eprintln!("xtask: setup complete");
    Ok(())
}

/// Everything `cargo xtask test` drives besides the toolchain.
fn test_packages() -> Vec<&'static str> {
    [TEST_PACKAGES, containers::PACKAGES, manifests::PACKAGES].concat()
}

fn need_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("{what} needs root: run it with `sudo -E cargo xtask ...`");
    }
    Ok(())
}

/// conntrace's image with the debug binary, for `tests/tests/image.rs`; removed on drop.
struct TestImage;

impl TestImage {
    fn build() -> anyhow::Result<Self> {
        containers::build_image(
            &target_dir()?.join("debug/conntrace"),
            &[containers::TEST_IMAGE.to_owned()],
            false,
        )?;
        Ok(Self)
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        if let Err(e) = containers::remove_test_image() {
            eprintln!("xtask: warning: {e:#}");
        }
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// cargo's target directory (`target/` of the checkout, or CARGO_TARGET_DIR, or the
/// configured `build.target-dir`, wherever it is).
fn target_dir() -> anyhow::Result<PathBuf> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("spawn cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).context("cargo metadata")?;
    let dir = meta["target_directory"].as_str();
    Ok(dir
        .context("cargo metadata has no target_directory")?
        .into())
}

/// `cargo` with bpf-linker on PATH (cargo install puts it in ~/.cargo/bin).
fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    let bin = cargo_bin_dir().display().to_string();
    let path = std::env::var("PATH").unwrap_or_default();
    if !path.split(':').any(|p| p == bin) {
        c.env("PATH", format!("{bin}:{path}"));
    }
    c.current_dir(workspace_root());
    c
}

/// Before anything is set up or built: a checkout the VM guest cannot see ends the command with
/// exit 1 and one line (no backtrace, whatever RUST_BACKTRACE says).
fn refuse_vm_location() {
    if let Err(why) = vm::check_location() {
        eprintln!("xtask: {why:#}");
        std::process::exit(1);
    }
}

fn main() -> anyhow::Result<()> {
    match Args::parse().task {
        Task::Setup => setup(&test_packages()),
        Task::Run { args } => {
            setup(&[])?;
            run(cargo().args(["build", "--release", "-p", "conntrace"]))?;
            let bin = target_dir()?.join("release/conntrace");
            run(privileged(bin.to_str().context("non-UTF-8 path")?).args(&args))
        }
        Task::Bench { args } if args.iter().any(|a| a == "--help" || a == "-h") => {
            // Its options, without root, set-up or the conntrace build.
            run(cargo().args([
                "build",
                "--release",
                "-p",
                "conntrace-tests",
                "--bin",
                "ctbench",
            ]))?;
            run(Command::new(target_dir()?.join("release/ctbench")).args(&args))
        }
        Task::Bench { args } => {
            setup(BENCH_PACKAGES)?;
            if !is_root() {
                bail!(
                    "the benchmark needs root (eBPF, network namespaces): run `sudo -E cargo xtask bench`"
                );
            }
            run(cargo().args(["build", "--release", "-p", "conntrace"]))?;
            run(cargo().args(["build", "--release", "-p", "conntrace-tests", "--bins"]))?;
            let root = target_dir()?.join("release");
            run(Command::new(root.join("ctbench"))
                .env("CONNTRACE_BIN", root.join("conntrace"))
                .args(&args))
        }
        Task::VmTest {
            kernel,
            full,
            probe_only,
            attach,
            filters,
        } => {
            let kernels = vm::Series::named(&kernel)?;
            let modes = vm::modes(&attach)?;
            refuse_vm_location();
            setup(&[&test_packages()[..], vm::VM_PACKAGES].concat())?;
            vm::vm_test(&vm::Options {
                kernels,
                modes,
                full,
                filters,
                probe_only,
            })
        }
        Task::Image => {
            setup(containers::PACKAGES)?;
            need_root("building the image (Podman as root, mmdebstrap)")?;
            run(cargo().args(["build", "--release", "-p", "conntrace"]))?;
            let version = env!("CARGO_PKG_VERSION");
            containers::build_image(
                &target_dir()?.join("release/conntrace"),
                &[
                    format!("{}:{version}", containers::IMAGE),
                    format!("{}:latest", containers::IMAGE),
                ],
                true,
            )
        }
        Task::Images => {
            setup(containers::PACKAGES)?;
            need_root("building images (Podman as root, mmdebstrap, containerd)")?;
            // A containerd started here for the import stops again at the end.
            let _containerd = containers::Containerd::ensure()?;
            containers::test_base()
        }
        Task::Manifests => {
            setup(manifests::PACKAGES)?;
            manifests::validate()
        }
        Task::Test { no_vm, args } => {
            if !no_vm && args.is_empty() {
                refuse_vm_location();
            }
            setup(&[&test_packages()[..], vm::VM_PACKAGES].concat())?;
            run(cargo().args(["build", "-p", "conntrace"]))?;
            // Unit tests (no privileges needed), then the scenarios: one at a time, since each
            // builds network namespaces and loads its own eBPF programs.
            // The eBPF crate only builds for the BPF target (conntrace's build.rs does that).
            run(cargo()
                .args([
                    "test",
                    "--workspace",
                    "--exclude",
                    "conntrace-ebpf",
                    "--lib",
                    "--bins",
                ])
                .arg("--")
                .args(&args))?;
            manifests::validate()?;
            if !is_root() {
                bail!(
                    "the integration scenarios need root (eBPF, network namespaces): run `sudo -E cargo xtask test`"
                );
            }
            // The container scenarios: containerd running (started here if it is not, and
            // stopped again at the end), the tests' base image in Podman and containerd, and
            // conntrace's image from the same Containerfile as `cargo xtask image`, with the
            // debug binary (removed at the end; the base images stay cached).
            let _containerd = containers::Containerd::ensure()?;
            containers::run_netns_mount()?;
            containers::test_base()?;
            let _image = TestImage::build()?;
            let bin = target_dir()?.join("debug/conntrace");
            run(cargo()
                .args(["test", "-p", "conntrace-tests", "--tests"])
                .env("CONNTRACE_BIN", bin)
                .env("CONNTRACE_IMAGE", containers::TEST_IMAGE)
                .env("CONTAINERS_CONF", containers::containers_conf())
                .arg("--")
                .args(["--test-threads", "1"])
                .args(&args))?;
            if no_vm || !args.is_empty() {
                eprintln!("xtask: VM stage skipped (run `cargo xtask vm-test`)");
                return Ok(());
            }
            vm::vm_test(&vm::Options {
                kernels: vm::Series::named("6.12")?,
                modes: vec!["best"],
                full: false,
                filters: Vec::new(),
                probe_only: false,
            })?;
            // Debian's 6.1 verifier is the strictest of the kernels conntrace supports (it
            // refused two programs once, unseen by the 6.12 stage): every program must load
            // there, in both attach modes.
            vm::vm_test(&vm::Options {
                kernels: vm::Series::named("6.1")?,
                modes: vec!["best", "tracepoints"],
                full: false,
                filters: Vec::new(),
                probe_only: true,
            })
        }
    }
}

//! Real containers: Podman with the project's containers.conf (runc, no default rlimits, no
//! default network) and the images `cargo xtask test` builds. Containers never use Podman's
//! bridge network: they join a namespace a test made (`--network ns:/run/netns/NAME`) or, for
//! conntrace itself, the host's (which it only reads).

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use crate::sh;

/// The tests' containers.conf: CONTAINERS_CONF if set, else `tests/containers/containers.conf`.
pub fn containers_conf() -> PathBuf {
    std::env::var_os("CONTAINERS_CONF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("containers/containers.conf")
        })
}

/// `podman` with the tests' containers.conf.
pub fn podman() -> Command {
    let mut c = Command::new("podman");
    c.env("CONTAINERS_CONF", containers_conf());
    c
}

/// conntrace's image as `cargo xtask test` builds it (CONNTRACE_IMAGE, else
/// `localhost/conntrace:test`); panics if Podman does not have it.
pub fn conntrace_image() -> String {
    let image =
        std::env::var("CONNTRACE_IMAGE").unwrap_or_else(|_| "localhost/conntrace:test".into());
    let exists = podman()
        .args(["image", "exists", &image])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        exists,
        "image {image} not built: run `cargo xtask test` (or `cargo xtask image` and set CONNTRACE_IMAGE)"
    );
    image
}

/// A named Podman container, removed (`podman rm --force`) on drop, also when a test panics.
pub struct Container {
    pub name: String,
}

impl Container {
    /// A fresh name for a container this test will start; nothing runs yet.
    pub fn named(prefix: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self {
            name: format!("{prefix}-{}-{n}", std::process::id()),
        }
    }

    /// The container's main process as the host sees it (0 when it is not running).
    pub fn host_pid(&self) -> u32 {
        let out = podman()
            .args(["inspect", "--format", "{{.State.Pid}}", &self.name])
            .output()
            .expect("run podman inspect");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let removed = podman()
            .args(["rm", "--force", "--ignore", "--time", "0", &self.name])
            .stdout(Stdio::null())
            .status();
        if !matches!(removed, Ok(s) if s.success()) {
            eprintln!("warning: could not remove container {}", self.name);
        }
    }
}

/// Makes sure containerd answers `ctr version` (for containerd scenarios). `cargo xtask test`
/// starts it before the tests when it is not running, and stops it after; a test run some other
/// way starts it here, in its own session, and leaves it running (it is a daemon: another test
/// may use it next). Its log goes to `<temp dir>/conntrace-tests-containerd.log`.
pub fn ensure_containerd() {
    let answers = || {
        Command::new("ctr")
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if answers() {
        return;
    }
    let log_path = std::env::temp_dir().join("conntrace-tests-containerd.log");
    let log = std::fs::File::create(&log_path).expect("create containerd's log");
    // setsid(1) detaches it from the test's session and process group.
    let mut daemon = Command::new("setsid")
        .arg("containerd")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start containerd (package containerd; `cargo xtask setup`)");
    // Reaped if it exits while the tests run; left running when they end.
    std::thread::spawn(move || daemon.wait());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !answers() {
        assert!(
            std::time::Instant::now() < deadline,
            "containerd did not answer within 30 s: see {}",
            log_path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    eprintln!(
        "started containerd (left running; log {})",
        log_path.display()
    );
}

/// `/run/netns` as `ip netns add` leaves it, a shared mount point, so that a container that
/// bind-mounts it (`rslave`) sees the namespaces made after it started.
pub fn run_netns_mount() {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    if mountinfo
        .lines()
        .any(|l| l.split(' ').nth(4) == Some("/run/netns"))
    {
        return;
    }
    let probe = format!("ctprobe{}", std::process::id());
    sh(&["ip", "netns", "add", &probe]);
    sh(&["ip", "netns", "del", &probe]);
}

/// What no test may change in the machine's own network namespace: its firewall (nftables and
/// iptables), ip_forward and the sysctl Podman sets in containers by default.
#[derive(Debug, PartialEq, Eq)]
pub struct RootNamespace {
    nft: String,
    iptables: String,
    ip_forward: String,
    ping_group_range: String,
}

impl RootNamespace {
    pub fn now() -> Self {
        Self {
            nft: sh(&["nft", "list", "ruleset"]),
            iptables: sh(&["iptables", "-S"]),
            ip_forward: sh(&["sysctl", "-n", "net.ipv4.ip_forward"]),
            ping_group_range: sh(&["sysctl", "-n", "net.ipv4.ping_group_range"]),
        }
    }
}

/// Memory and CPU of a container's cgroup, read from the cgroup file systems (v1 or v2).
pub struct CgroupFigures {
    /// Most memory the cgroup was charged at once (its processes, page cache and the BPF
    /// maps they created, which are charged to the memory cgroup since 5.11), in MiB.
    pub peak_mib: f64,
    /// Memory charged to the cgroup now, in MiB.
    pub now_mib: f64,
    /// CPU time used by the cgroup so far, in seconds.
    pub cpu_s: f64,
}

impl CgroupFigures {
    pub fn of(pid: u32) -> Self {
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
        let path_of = |controller: &str| {
            cgroups.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
                names
                    .split(',')
                    .any(|n| n == controller)
                    .then(|| path.to_owned())
            })
        };
        let read = |file: String| {
            std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("read {file}: {e}"))
                .trim()
                .to_owned()
        };
        if let (Some(memory), Some(cpu)) = (path_of("memory"), path_of("cpuacct")) {
            let peak = read(format!(
                "/sys/fs/cgroup/memory{memory}/memory.max_usage_in_bytes"
            ));
            let now = read(format!(
                "/sys/fs/cgroup/memory{memory}/memory.usage_in_bytes"
            ));
            let usage = read(format!("/sys/fs/cgroup/cpuacct{cpu}/cpuacct.usage"));
            return Self {
                peak_mib: peak.parse::<f64>().expect("bytes") / 1_048_576.0,
                now_mib: now.parse::<f64>().expect("bytes") / 1_048_576.0,
                cpu_s: usage.parse::<f64>().expect("ns") / 1e9,
            };
        }
        let path = cgroups
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup v2 path");
        let peak = read(format!("/sys/fs/cgroup{path}/memory.peak"));
        let now = read(format!("/sys/fs/cgroup{path}/memory.current"));
        let stat = read(format!("/sys/fs/cgroup{path}/cpu.stat"));
        let usec = stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .expect("usage_usec");
        Self {
            peak_mib: peak.parse::<f64>().expect("bytes") / 1_048_576.0,
            now_mib: now.parse::<f64>().expect("bytes") / 1_048_576.0,
            cpu_s: usec.parse::<f64>().expect("us") / 1e6,
        }
    }
}

/// The container scenarios' image (Debian bookworm minbase with python3), in Podman and in
/// containerd's `k8s.io` namespace: `cargo xtask test` (or `cargo xtask images`) builds it with
/// mmdebstrap once and keeps it.
pub const TEST_BASE: &str = "localhost/debian:bookworm-min";
/// containerd's namespace for Kubernetes' pods, where the pod scenario runs.
pub const K8S_NAMESPACE: &str = "k8s.io";

/// [`TEST_BASE`], panicking with how to build it when Podman does not have it.
fn test_base() -> &'static str {
    let exists = podman()
        .args(["image", "exists", TEST_BASE])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        exists,
        "image {TEST_BASE} not built: run `cargo xtask test` (or `cargo xtask images`)"
    );
    TEST_BASE
}

/// A name no other run of the scenarios uses at the same time: `PREFIX-PID`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", std::process::id())
}

fn output_of(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Podman's Docker-compatible API (`podman system service`) on a socket in a directory of its
/// own, for conntrace's `--docker-socket`; stopped on drop.
pub struct PodmanService {
    // Drops in this order: the service, then its directory.
    _service: crate::Proc,
    dir: crate::TempDir,
}

impl PodmanService {
    pub fn start() -> Self {
        let dir = crate::TempDir::new("ct-podman");
        let socket = dir.join("podman.sock");
        let uri = format!("unix://{}", socket.display());
        let service = crate::Proc::spawn(
            podman()
                .args(["system", "service", "--time=0", &uri])
                .stdout(Stdio::null()),
            "podman system service",
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "podman system service: no socket after 20 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Self {
            _service: service,
            dir,
        }
    }

    /// The socket, for conntrace's `--docker-socket`.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("podman.sock")
    }
}

/// A Podman container running `sleep infinity` in network namespace `ns` (never Podman's
/// bridge), with the test peer mounted at /usr/local/bin/ctpeer; removed on drop (the
/// [`Container`] guard).
pub struct PodmanContainer {
    pub container: Container,
    pub id: String,
}

impl PodmanContainer {
    /// Starts a container named `PREFIX-PID-N` ([`Container::named`]).
    pub fn run(prefix: &str, ns: &crate::Netns) -> Self {
        let image = test_base();
        let container = Container::named(prefix);
        let network = format!("ns:/run/netns/{}", ns.name);
        let peer = format!("{}:/usr/local/bin/ctpeer:ro", crate::ctpeer().display());
        let id = output_of(podman().args([
            "run",
            "-d",
            "--name",
            &container.name,
            "--network",
            &network,
            "-v",
            &peer,
            image,
            "sleep",
            "infinity",
        ]));
        Self { container, id }
    }

    pub fn name(&self) -> &str {
        &self.container.name
    }

    /// Starts `ctpeer connect ADDR PORT EXTRA...` inside the container (`podman exec`); read
    /// its results with [`crate::Proc::json_lines`].
    pub fn connect(&self, addr: &str, port: u16, extra: &[&str]) -> crate::Proc {
        crate::Proc::spawn(
            podman()
                .args(["exec", &self.container.name, "/usr/local/bin/ctpeer"])
                .args(["connect", addr, &port.to_string()])
                .args(extra)
                .stdout(Stdio::piped()),
            "ctpeer connect in a container",
        )
        .read_stdout()
    }
}

/// Whether Podman still has a container named `name`.
pub fn podman_has(name: &str) -> bool {
    let filter = format!("name=^{name}$");
    !output_of(podman().args(["ps", "-a", "-q", "--filter", &filter])).is_empty()
}

/// A containerd task in the `k8s.io` namespace running `sleep infinity` in network namespace
/// `ns` (`ctr run --with-ns network:/run/netns/NAME`), with `labels` (e.g. the CRI's pod
/// labels); killed and removed with its snapshot on drop.
pub struct CtrContainer {
    pub id: String,
}

impl CtrContainer {
    pub fn run(id: &str, ns: &crate::Netns, labels: &[(&str, &str)]) -> Self {
        ensure_containerd();
        let network = format!("network:/run/netns/{}", ns.name);
        remove_ctr(id);
        let mut cmd = Command::new("ctr");
        cmd.args(["-n", K8S_NAMESPACE, "run", "-d", "--with-ns", &network]);
        for (k, v) in labels {
            cmd.args(["--label", &format!("{k}={v}")]);
        }
        output_of(cmd.args([TEST_BASE, id, "sleep", "infinity"]));
        Self { id: id.to_owned() }
    }
}

/// Kills and removes the task and the container `id` (and its snapshot), if there are any.
fn remove_ctr(id: &str) {
    for args in [
        ["tasks", "rm", "-f", id].as_slice(),
        &["containers", "rm", id],
    ] {
        let _ = Command::new("ctr")
            .args(["-n", K8S_NAMESPACE])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for CtrContainer {
    fn drop(&mut self) {
        remove_ctr(&self.id);
    }
}

/// Whether containerd still has a container `id` in `k8s.io`.
pub fn ctr_has(id: &str) -> bool {
    sh(&["ctr", "-n", K8S_NAMESPACE, "containers", "ls", "-q"])
        .lines()
        .any(|l| l.trim() == id)
}

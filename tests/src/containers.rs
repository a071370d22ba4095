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
    Command::new("setsid")
        .arg("containerd")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start containerd (package containerd; `cargo xtask setup`)");
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

//! Real containers for the container scenarios, each removed on drop (also when a test
//! panics): Podman containers and containerd tasks that join a network namespace the test made
//! (`podman run --network ns:/run/netns/NAME`, `ctr run --with-ns network:/run/netns/NAME`),
//! never Podman's default bridge network, which would add rules to the machine's own firewall
//! and turn on its ip_forward. Podman's Docker-compatible API service runs on a socket of the
//! test's own; containerd is the machine's (started here if it does not run).

use std::{
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    Netns, Proc, TempDir, ctpeer,
    images::{K8S_NAMESPACE, ensure_containerd_image, ensure_podman_image, podman},
    sh,
};

/// A name no other run of the scenarios uses at the same time: `PREFIX-PID`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", std::process::id())
}

fn run(cmd: &mut Command) -> String {
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

fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{what}: not ready after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Podman's Docker-compatible API (`podman system service`) on a socket in a directory of its
/// own; stopped on drop.
pub struct PodmanService {
    // Drops in this order: the service, then its directory.
    _service: Proc,
    dir: TempDir,
}

impl PodmanService {
    pub fn start() -> Self {
        let dir = TempDir::new("ct-podman");
        let socket = dir.join("podman.sock");
        let uri = format!("unix://{}", socket.display());
        let service = Proc::spawn(
            podman()
                .args(["system", "service", "--time=0", &uri])
                .stdout(Stdio::null()),
            "podman system service",
        );
        wait_until("podman system service", Duration::from_secs(20), || {
            socket.exists()
        });
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

/// A Podman container running `sleep infinity` in network namespace `ns`, with the test peer
/// mounted at /usr/local/bin/ctpeer; removed (`podman rm -f`) on drop.
pub struct PodmanContainer {
    pub name: String,
    pub id: String,
}

impl PodmanContainer {
    pub fn run(name: &str, ns: &Netns) -> Self {
        let image = ensure_podman_image();
        let network = format!("ns:/run/netns/{}", ns.name);
        let peer = format!("{}:/usr/local/bin/ctpeer:ro", ctpeer().display());
        // Left over from an interrupted run of the same process id.
        let _ = podman().args(["rm", "-f", "-t", "0", name]).output();
        let id = run(podman().args([
            "run",
            "-d",
            "--name",
            name,
            "--network",
            &network,
            "-v",
            &peer,
            image,
            "sleep",
            "infinity",
        ]));
        Self {
            name: name.to_owned(),
            id,
        }
    }

    /// `podman exec NAME PROGRAM`: a process inside the container.
    pub fn exec(&self, program: &str) -> Command {
        let mut c = podman();
        c.args(["exec", &self.name, program]);
        c
    }

    /// Starts `ctpeer connect ADDR PORT EXTRA...` inside the container; read its results with
    /// [`Proc::json_lines`].
    pub fn connect(&self, addr: &str, port: u16, extra: &[&str]) -> Proc {
        Proc::spawn(
            self.exec("/usr/local/bin/ctpeer")
                .args(["connect", addr, &port.to_string()])
                .args(extra)
                .stdout(Stdio::piped()),
            "ctpeer connect in a container",
        )
        .read_stdout()
    }
}

impl Drop for PodmanContainer {
    fn drop(&mut self) {
        match podman().args(["rm", "-f", "-t", "0", &self.name]).output() {
            Ok(o) if o.status.success() => {}
            _ => eprintln!("warning: could not remove podman container {}", self.name),
        }
    }
}

/// Whether Podman still has a container named `name`.
pub fn podman_has(name: &str) -> bool {
    let filter = format!("name=^{name}$");
    !run(podman().args(["ps", "-a", "-q", "--filter", &filter])).is_empty()
}

/// Starts containerd (detached, as its service would be) unless it answers already.
pub fn ensure_containerd() {
    let answers = || {
        Command::new("ctr")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if answers() {
        return;
    }
    let log = std::fs::File::create(std::env::temp_dir().join("conntrace-tests-containerd.log"))
        .expect("create the containerd log");
    // Left running, as its service would be (its own process group: not the test's to kill);
    // never waited for.
    #[allow(clippy::zombie_processes)]
    Command::new("containerd")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn containerd");
    wait_until("containerd", Duration::from_secs(30), answers);
}

/// A containerd task in the `k8s.io` namespace running `sleep infinity` in network namespace
/// `ns`, with `labels` (e.g. the CRI's pod labels); killed and removed on drop.
pub struct CtrContainer {
    pub id: String,
}

impl CtrContainer {
    pub fn run(id: &str, ns: &Netns, labels: &[(&str, &str)]) -> Self {
        ensure_containerd();
        let image = ensure_containerd_image();
        let network = format!("network:/run/netns/{}", ns.name);
        remove_ctr(id);
        let mut cmd = Command::new("ctr");
        cmd.args(["-n", K8S_NAMESPACE, "run", "-d", "--with-ns", &network]);
        for (k, v) in labels {
            cmd.args(["--label", &format!("{k}={v}")]);
        }
        run(cmd.args([image, id, "sleep", "infinity"]));
        Self { id: id.to_owned() }
    }

    /// The task's process id.
    pub fn pid(&self) -> u32 {
        let tasks = sh(&["ctr", "-n", K8S_NAMESPACE, "tasks", "ls"]);
        tasks
            .lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(self.id.as_str())).then(|| f.next()?.parse().ok())?
            })
            .expect("the task's pid")
    }
}

/// Kills and removes the task and the container `id` (and its snapshot), if there are any.
fn remove_ctr(id: &str) {
    let ctr = |args: &[&str]| {
        Command::new("ctr")
            .args(["-n", K8S_NAMESPACE])
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    ctr(&["tasks", "rm", "-f", id]);
    ctr(&["containers", "rm", id]);
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

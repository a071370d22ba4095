//! Real containers for the tests and conntrace's own image: Podman (with the project's
//! containers.conf), containerd (`ctr`), and images built locally from Debian's packages with
//! mmdebstrap, since no image registry is reachable here.
//!
//! Nothing here touches the machine's network: Podman's default network is `none` in
//! `tests/containers/containers.conf`, containers join namespaces the tests made, and the one
//! build step that downloads packages (`apt-get` in the Containerfile) runs in the host's
//! network namespace (`--network host`), which it only uses, never changes.

use std::{
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{run, succeeds, workspace_root};

/// Debian packages for containers: the engines, the runtime and the image builder. As root
/// and without Podman's bridge, neither uidmap nor slirp4netns is needed.
pub const PACKAGES: &[&str] = &["podman", "runc", "containerd", "mmdebstrap"];

/// The tests' base image (Podman and containerd's `k8s.io` namespace): Debian minbase with
/// python3 for the test servers.
pub const TEST_BASE: &str = "localhost/debian:bookworm-min";
/// The Containerfile's base, made locally when it is not in Podman's storage.
pub const SLIM_BASE: &str = "docker.io/library/debian:bookworm-slim";
/// conntrace's image, from `cargo xtask image` (release build).
pub const IMAGE: &str = "localhost/conntrace";
/// The image the tests run (`tests/tests/image.rs`): the same Containerfile, debug binary.
pub const TEST_IMAGE: &str = "localhost/conntrace:test";
/// containerd's namespace for Kubernetes' pods.
const K8S_NAMESPACE: &str = "k8s.io";

/// Paths dpkg leaves out of the slim base, as Debian's own `-slim` images do.
const SLIM_EXCLUDES: &[&str] = &[
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/lintian/*",
];

pub fn containers_conf() -> PathBuf {
    workspace_root().join("tests/containers/containers.conf")
}

/// `podman` with the project's containers.conf (runc, no default rlimits, no default network).
pub fn podman() -> Command {
    let mut c = Command::new("podman");
    c.env("CONTAINERS_CONF", containers_conf());
    c
}

fn scratch() -> anyhow::Result<PathBuf> {
    let dir = workspace_root().join("target/containers");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

fn podman_has(image: &str) -> bool {
    succeeds(podman().args(["image", "exists", image]))
}

/// Runs mmdebstrap (minbase) into a tarball and imports it into Podman as `name`; the tarball
/// is removed afterwards (Podman's storage is the cache).
fn debootstrap_into_podman(name: &str, include: &[&str], dpkg_opts: &[&str]) -> anyhow::Result<()> {
    let tar = scratch()?.join(format!("{}.tar", name.replace(['/', ':'], "_")));
    let mut mm = Command::new("mmdebstrap");
    mm.args(["--variant=minbase", "--quiet"]);
    if !include.is_empty() {
        mm.arg(format!("--include={}", include.join(",")));
    }
    for opt in dpkg_opts {
        mm.arg(format!("--dpkgopt={opt}"));
    }
    mm.arg("bookworm").arg(&tar);
    let made = run(&mut mm).and_then(|()| {
        run(podman()
            .args(["import", "--quiet", "--change", "CMD [\"bash\"]"])
            .arg(&tar)
            .arg(name))
    });
    std::fs::remove_file(&tar).ok();
    made
}

/// The tests' base image in Podman and in containerd's `k8s.io` namespace, built once
/// (mmdebstrap, about a minute) and reused while present.
pub fn test_base() -> anyhow::Result<()> {
    if !podman_has(TEST_BASE) {
        eprintln!("xtask: building {TEST_BASE} with mmdebstrap (once; kept in Podman's storage)");
        debootstrap_into_podman(TEST_BASE, &["python3-minimal"], &[])?;
    }
    let listed = Command::new("ctr")
        .args(["-n", K8S_NAMESPACE, "images", "ls", "-q"])
        .output()
        .context("run ctr (is containerd running?)")?;
    if !listed.status.success() {
        bail!(
            "ctr -n {K8S_NAMESPACE} images ls: {}",
            String::from_utf8_lossy(&listed.stderr)
        );
    }
    if !String::from_utf8_lossy(&listed.stdout)
        .lines()
        .any(|l| l == TEST_BASE)
    {
        // ctr imports OCI archives (and Docker's); the archive names the image in its index.
        let archive = scratch()?.join("bookworm-min.oci.tar");
        let imported = run(podman()
            .args(["save", "--quiet", "--format", "oci-archive", "-o"])
            .arg(&archive)
            .arg(TEST_BASE))
        .and_then(|()| {
            run(Command::new("ctr")
                .args(["-n", K8S_NAMESPACE, "images", "import"])
                .arg(&archive))
        });
        std::fs::remove_file(&archive).ok();
        imported?;
    }
    Ok(())
}

/// The Containerfile's base: from Podman's storage if there (pulled where a registry is
/// reachable, or made earlier), else made here with mmdebstrap and tagged with its name.
pub fn slim_base() -> anyhow::Result<()> {
    if !podman_has(SLIM_BASE) {
        eprintln!(
            "xtask: {SLIM_BASE} is not in Podman's storage: building it with mmdebstrap (no registry needed; kept)"
        );
        debootstrap_into_podman(SLIM_BASE, &[], SLIM_EXCLUDES)?;
    }
    Ok(())
}

/// Builds the Containerfile with `binary` (relative to the workspace) as `tags`. With `layers`,
/// Podman keeps each step's image as a cache for the next build; without, the build leaves
/// nothing but the image itself (the tests' image, removed after the run).
pub fn build_image(binary: &std::path::Path, tags: &[String], layers: bool) -> anyhow::Result<()> {
    slim_base()?;
    // The build context is the workspace; cargo's target directory may be elsewhere
    // (CARGO_TARGET_DIR): the binary is staged inside the context first.
    let stage = workspace_root().join("target/containers/stage");
    std::fs::create_dir_all(&stage).with_context(|| format!("create {}", stage.display()))?;
    std::fs::copy(binary, stage.join("conntrace"))
        .with_context(|| format!("stage {} for the image", binary.display()))?;
    let binary = "target/containers/stage/conntrace";
    let mut build = podman();
    build
        .current_dir(workspace_root())
        // The base is local; `apt-get` downloads in the host's namespace, changing nothing.
        .args(["build", "--pull=never", "--network", "host"])
        .arg(format!("--layers={layers}"))
        .args(["-f", "Containerfile", "--build-arg"])
        .arg(format!("BINARY={binary}"));
    for tag in tags {
        build.args(["-t", tag]);
    }
    run(build.arg("."))
}

/// Removes the test image (built without cached layers: nothing else is left; the bases stay).
pub fn remove_test_image() -> anyhow::Result<()> {
    if podman_has(TEST_IMAGE) {
        run(podman().args(["rmi", "--force", TEST_IMAGE]))?;
    }
    Ok(())
}

/// containerd started by xtask for the tests, stopped (SIGTERM) when dropped. `None` from
/// [`Containerd::ensure`] when one was already running: that one is left alone.
pub struct Containerd {
    child: Child,
}

impl Containerd {
    /// Makes sure containerd answers `ctr version`; starts it (its own session, log in
    /// target/containers/containerd.log) when it does not. Its CRI plugin sets up networks
    /// only for pods it is asked to run, and `ctr` asks for none.
    pub fn ensure() -> anyhow::Result<Option<Self>> {
        if succeeds(Command::new("ctr").arg("version")) {
            return Ok(None);
        }
        let log = scratch()?.join("containerd.log");
        let out =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = Command::new("containerd");
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // SAFETY: setsid is async-signal-safe; it detaches the daemon from our terminal's
        // signals (a ^C on xtask must not kill it before it is stopped in order).
        unsafe {
            cmd.pre_exec(|| {
                libc_setsid();
                Ok(())
            })
        };
        eprintln!("xtask: starting containerd (log: {})", log.display());
        let child = cmd
            .spawn()
            .context("start containerd (package containerd)")?;
        let daemon = Self { child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !succeeds(Command::new("ctr").arg("version")) {
            if Instant::now() > deadline {
                bail!(
                    "containerd did not answer within 30 s: see {}",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(Some(daemon))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        eprintln!("xtask: stopping the containerd it started");
        // SAFETY: kill(2) on our own, not yet reaped, child.
        unsafe { libc_kill(self.child.id() as i32, 15) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

unsafe extern "C" {
    #[link_name = "setsid"]
    fn libc_setsid() -> i32;
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// `/run/netns` as `ip netns add` leaves it: a shared mount point, so that a container that
/// bind-mounts it (`rslave`) sees the namespaces made after it started. A namespace made and
/// deleted at once sets it up when it is not one yet.
pub fn run_netns_mount() -> anyhow::Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("read mountinfo")?;
    if mountinfo
        .lines()
        .any(|l| l.split(' ').nth(4) == Some("/run/netns"))
    {
        return Ok(());
    }
    let probe = format!("xtask-probe-{}", std::process::id());
    run(Command::new("ip").args(["netns", "add", &probe]))?;
    run(Command::new("ip").args(["netns", "del", &probe]))
}

//! Debian's kernel packages, fetched with apt and unpacked under `target/vm/kernels/`
//! (nothing is installed), and the initramfs that boots them (`tests/vm/init`).

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::{TempDir, vm_dir};
use crate::{run, workspace_root};

/// Modules the initramfs loads to mount the host root (with their dependencies).
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

/// A Debian kernel series: packages `PREFIX<number>SUFFIX`, the newest number wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Series {
    pub label: &'static str,
    prefix: &'static str,
    suffix: &'static str,
}

pub const SERIES: &[Series] = &[
    Series {
        label: "6.1",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64",
    },
    Series {
        label: "6.12",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64",
    },
];

impl Series {
    pub fn named(label: &str) -> anyhow::Result<Vec<Self>> {
        if label == "all" {
            return Ok(SERIES.to_vec());
        }
        match SERIES.iter().find(|s| s.label == label) {
            Some(s) => Ok(vec![*s]),
            None => bail!("unknown kernel {label:?}: use 6.1, 6.12 or all"),
        }
    }

    /// The number in a package name of this series (`-dbg`, `-unsigned`, `cloud`, `rt` and
    /// other flavours do not match).
    fn number(&self, package: &str) -> Option<u32> {
        let middle = package
            .strip_prefix(self.prefix)?
            .strip_suffix(self.suffix)?;
        middle
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| middle.parse().ok())?
    }
}

/// kmod's tools live in /usr/sbin, which a user's PATH may lack.
fn sbin(tool: &str) -> PathBuf {
    let path = Path::new("/usr/sbin").join(tool);
    if path.exists() { path } else { tool.into() }
}

/// An unpacked kernel package.
pub struct Kernel {
    pub label: &'static str,
    pub package: String,
    pub release: String,
    pub root: PathBuf,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
        self.root.join(format!("boot/vmlinuz-{}", self.release))
    }
    pub fn modules(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

/// The newest package of `series` in apt's lists, unpacked under target/vm/kernels (downloaded
/// once). Without apt's answer or the download, the newest one already unpacked.
pub fn fetch_kernel(series: &Series) -> anyhow::Result<Kernel> {
    let cache = vm_dir().join("kernels");
    fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
    let cached = |package: &str| -> Option<Kernel> {
        let root = cache.join(package);
        let release = fs::read_to_string(root.join("ready")).ok()?;
        Some(Kernel {
            label: series.label,
            package: package.to_owned(),
            release: release.trim().to_owned(),
            root: root.join("root"),
        })
    };
    let newest_cached = || -> Option<Kernel> {
        let names = fs::read_dir(&cache).ok()?.flatten();
        let names = names.filter_map(|e| e.file_name().into_string().ok());
        let best = names.filter_map(|n| Some((series.number(&n)?, n))).max()?;
        cached(&best.1)
    };
    let package = match newest_package(series) {
        Ok(p) => p,
        Err(e) => {
            let k = newest_cached().ok_or(e)?;
            eprintln!(
                "xtask: apt has no {} kernel; using cached {}",
                series.label, k.package
            );
            return Ok(k);
        }
    };
    if let Some(k) = cached(&package) {
        return Ok(k);
    }
    match download(&cache, &package) {
        Ok(()) => {
            // The older packages of this series are not needed any more.
            for entry in fs::read_dir(&cache)?.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let stem = name.strip_suffix(".partial").unwrap_or(&name);
                if name != package && series.number(stem).is_some() {
                    fs::remove_dir_all(entry.path()).ok();
                }
            }
            cached(&package).context("kernel cache incomplete after unpacking")
        }
        Err(e) => {
            fs::remove_dir_all(cache.join(format!("{package}.partial"))).ok();
            let k = newest_cached().ok_or(e)?;
            eprintln!(
                "xtask: could not download {package}; using cached {}",
                k.package
            );
            Ok(k)
        }
    }
}

fn newest_package(series: &Series) -> anyhow::Result<String> {
    let pattern = format!("^{}", series.prefix.replace('.', "\\."));
    let out = Command::new("apt-cache")
        .args(["search", "--names-only", &pattern])
        .output()
        .context("run apt-cache")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|p| Some((series.number(p)?, p.to_owned())))
        .max()
        .map(|(_, p)| p)
        .with_context(|| {
            format!(
                "apt knows no {}NUMBER{} package (run `apt-get update`?)",
                series.prefix, series.suffix
            )
        })
}

/// `apt-get download` and `dpkg-deb -x` into cache/PACKAGE/root, indexed by depmod there;
/// cache/PACKAGE/ready (the kernel release) marks it complete.
fn download(cache: &Path, package: &str) -> anyhow::Result<()> {
    let partial = cache.join(format!("{package}.partial"));
    if partial.exists() {
        fs::remove_dir_all(&partial)?;
    }
    fs::create_dir_all(&partial)?;
    run(Command::new("apt-get")
        .args(["download", package])
        .current_dir(&partial))?;
    let deb = fs::read_dir(&partial)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    let root = partial.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let mut releases = fs::read_dir(root.join("lib/modules"))
        .context("the package has no lib/modules")?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok());
    let release = releases.next().context("no release under lib/modules")?;
    if !root.join(format!("boot/vmlinuz-{release}")).exists() {
        bail!("{package} has no boot/vmlinuz-{release}");
    }
    // modules.dep is made by the package's postinst, which never runs here.
    run(Command::new(sbin("depmod"))
        .arg("-b")
        .arg(&root)
        .arg(&release))?;
    fs::remove_file(&deb)?;
    fs::write(partial.join("ready"), &release)?;
    let done = cache.join(package);
    if done.exists() {
        fs::remove_dir_all(&done)?;
    }
    fs::rename(&partial, &done)?;
    Ok(())
}

/// The initramfs: static busybox, tests/vm/init as /init, its path list `paths`
/// ([`super::paths::guest_list`]) as /paths, the kernel's modules for 9p and overlayfs
/// (uncompressed, in load order), packed by `busybox cpio`.
pub fn initramfs(kernel: &Kernel, run_dir: &Path, paths: &str) -> anyhow::Result<PathBuf> {
    let staging = TempDir::new(run_dir.join("initramfs"))?;
    let dir = &staging.0;
    let vm_src = workspace_root().join("tests/vm");
    fs::create_dir_all(dir.join("bin"))?;
    fs::create_dir_all(dir.join("modules"))?;
    fs::copy("/bin/busybox", dir.join("bin/busybox")).context("copy /bin/busybox")?;
    fs::copy(vm_src.join("init"), dir.join("init")).context("copy tests/vm/init")?;
    fs::copy(vm_src.join("ctmodprobe"), dir.join("bin/ctmodprobe"))?;
    fs::write(dir.join("paths"), paths)?;
    let mut order = Vec::<String>::new();
    for module in BOOT_MODULES {
        let out = Command::new(sbin("modprobe"))
            .arg("-d")
            .arg(&kernel.root)
            .args(["-S", &kernel.release, "--show-depends", module])
            .output()
            .context("run modprobe --show-depends")?;
        if !out.status.success() {
            bail!(
                "modprobe --show-depends {module} for {}: {}",
                kernel.release,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(path) = line.strip_prefix("insmod ").map(str::trim) else {
                continue; // "builtin NAME"
            };
            let file = Path::new(path).file_name().and_then(|f| f.to_str());
            let file = file.context("module path")?;
            let (name, decompress) = match file.rsplit_once(".ko") {
                Some((stem, ".xz")) => (format!("{stem}.ko"), Some("xz")),
                Some((stem, ".zst")) => (format!("{stem}.ko"), Some("zstd")),
                Some((stem, ".gz")) => (format!("{stem}.ko"), Some("gzip")),
                _ => (file.to_owned(), None),
            };
            if order.contains(&name) {
                continue;
            }
            let dest = dir.join("modules").join(&name);
            match decompress {
                Some(tool) => {
                    let out = fs::File::create(&dest)?;
                    run(Command::new(tool).args(["-dc", path]).stdout(out))?;
                }
                None => {
                    fs::copy(path, &dest).with_context(|| format!("copy {path}"))?;
                }
            }
            order.push(name);
        }
    }
    fs::write(dir.join("modules/order"), order.join("\n") + "\n")?;
    for exe in ["init", "bin/ctmodprobe", "bin/busybox"] {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(dir.join(exe), fs::Permissions::from_mode(0o755))?;
    }
    let mut entries = Vec::new();
    collect(dir, Path::new("."), &mut entries)?;
    let image = run_dir.join("initramfs.cpio");
    let mut cpio = Command::new("busybox")
        .args(["cpio", "-o", "-H", "newc"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(fs::File::create(&image)?)
        .stderr(Stdio::null())
        .spawn()
        .context("spawn busybox cpio")?;
    cpio.stdin
        .take()
        .context("cpio stdin")?
        .write_all((entries.join("\n") + "\n").as_bytes())?;
    let status = cpio.wait()?;
    if !status.success() {
        bail!("busybox cpio failed: {status}");
    }
    Ok(image)
}

/// Every path under `dir`, relative, parents first.
fn collect(dir: &Path, rel: &Path, out: &mut Vec<String>) -> anyhow::Result<()> {
    out.push(rel.display().to_string());
    let full = dir.join(rel);
    if full.is_dir() {
        for entry in fs::read_dir(&full)? {
            collect(dir, &rel.join(entry?.file_name()), out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_plain_signed_images_of_a_series_match() {
        let (v61, v612) = (SERIES[0], SERIES[1]);
        assert_eq!(v61.number("linux-image-6.1.0-56-amd64"), Some(56));
        assert_eq!(v612.number("linux-image-6.12.117+deb12-amd64"), Some(117));
        for other in [
            "linux-image-6.1.0-56-amd64-dbg",
            "linux-image-6.1.0-56-amd64-unsigned",
            "linux-image-6.1.0-56-rt-amd64",
            "linux-image-6.1.0-56-cloud-amd64",
            "linux-image-6.12.117+deb12-amd64",
        ] {
            assert_eq!(v61.number(other), None, "{other}");
        }
        assert_eq!(v612.number("linux-image-6.12.117+deb12-cloud-amd64"), None);
        assert_eq!(v612.number("linux-image-6.12.117+deb12-amd64-dbg"), None);
    }
}

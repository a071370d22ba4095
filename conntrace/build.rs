//! Builds `conntrace-ebpf` for the BPF target and leaves the object in `OUT_DIR`, where
//! `src/kernel/mod.rs` embeds it with `include_bytes_aligned!`.
//!
//! The eBPF target needs `-Z build-std=core`, i.e. a toolchain with the `core` sources.
//! `CONNTRACE_BPF_TOOLCHAIN` names it; without it, `system-bpf` (Debian's `rustc-web` with
//! `rust-web-src`, linked by `cargo xtask setup`) is used when rustup knows it, else `nightly`.
use std::process::Command;

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn toolchain_works(name: &str) -> bool {
    Command::new("rustup")
        .args(["run", name, "rustc", "--version"])
        .output()
        .is_ok_and(|out| out.status.success())
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=CONNTRACE_BPF_TOOLCHAIN");
    let toolchain = match std::env::var("CONNTRACE_BPF_TOOLCHAIN") {
        Ok(name) => name,
        Err(_) if toolchain_works("system-bpf") => "system-bpf".to_owned(),
        Err(_) => "nightly".to_owned(),
    };
    if toolchain != "nightly" && std::env::var_os("RUSTC_BOOTSTRAP").is_none() {
        // A stable-channel compiler with the library sources: allow `-Z build-std=core`.
        // SAFETY: the build script is single-threaded at this point.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    }

    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let package = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "conntrace-ebpf")
        .ok_or_else(|| anyhow!("conntrace-ebpf package not found in the workspace"))?;
    let root_dir = package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", package.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: package.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
    .with_context(|| {
        format!(
            "building conntrace-ebpf with the `{toolchain}` toolchain (see `cargo xtask setup`)"
        )
    })
}

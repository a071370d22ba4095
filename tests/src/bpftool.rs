//! What the kernel says about loaded eBPF programs, through `bpftool` (package `bpftool`):
//! their run counts and whether any link attaches them, for the programs of one conntrace
//! process (other conntrace processes on the machine load programs of the same names).

use std::process::Command;

use serde_json::Value;

fn bpftool_json(args: &[&str]) -> Vec<Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("run bpftool (package bpftool)");
    assert!(out.status.success(), "bpftool {args:?}: {out:?}");
    serde_json::from_slice(&out.stdout).expect("bpftool's JSON")
}

/// `bpftool prog show`: every loaded program.
pub fn programs() -> Vec<Value> {
    bpftool_json(&["prog", "show"])
}

/// The kernel's run count of program `id` (bpftool leaves it out while it is 0, and while
/// the run-time statistics are off).
pub fn run_count(id: u64) -> u64 {
    programs()
        .iter()
        .find(|p| p["id"] == id)
        .and_then(|p| p["run_cnt"].as_u64())
        .unwrap_or(0)
}

/// Whether a BPF link attaches program `id` (`bpftool link show`).
pub fn linked(id: u64) -> bool {
    bpftool_json(&["link", "show"])
        .iter()
        .any(|l| l["prog_id"] == id)
}

/// The ids of the programs process `pid` holds, from its descriptors' fdinfo (`prog_id:`).
pub fn program_ids_of(pid: u32) -> Vec<u64> {
    let dir = format!("/proc/{pid}/fdinfo");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect()
}

/// The id of program `name` (as the `ready` record names it) that process `pid` holds.
pub fn program_id(pid: u32, name: &str) -> u64 {
    let owned = program_ids_of(pid);
    programs()
        .iter()
        .filter(|p| p["name"] == name)
        .filter_map(|p| p["id"].as_u64())
        .find(|id| owned.contains(id))
        .unwrap_or_else(|| panic!("process {pid} holds no program {name}"))
}

//! Attaching the programs to their hooks, walking the attach table (`attach.rs`) for the
//! running kernel: the best rule of each capability that loads and attaches wins.

use aya::{
    Ebpf,
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSockAddr, FEntry, FExit, ProgramError, TracePoint,
    },
};
use tracing::{debug, warn};

use super::{
    ActiveProgram, LoadError, TracerOptions, Unavailable, WITHOUT_REASON,
    attach::{self, Capability, Hook},
    packet_gate::{self, PacketGate, PacketLink},
};

/// Why one attach rule did not attach: the syscall that failed and aya's error (whose
/// `Display` of a load failure includes the verifier's log).
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("program {0} is not in the eBPF object")]
    NotInObject(&'static str),
    #[error("program {0} is not at a per-packet hook")]
    NotPerPacket(&'static str),
    #[error("kernel BTF unavailable (/sys/kernel/btf/vmlinux)")]
    NoBtf,
    #[error("program {program} is not of the hook's type: {source}")]
    WrongType {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("bpf(BPF_PROG_LOAD) {hook}: {source}")]
    Load {
        hook: String,
        #[source]
        source: ProgramError,
    },
    /// The whole chain of aya's error is in the message (its errno is in a source): not a
    /// `source` of its own, so that `{:#}` does not print it twice.
    #[error("attach {hook} ({syscall}): {}", chain(error))]
    Attach {
        hook: String,
        syscall: &'static str,
        error: ProgramError,
    },
    #[error("{hook}: the root cgroup (v2): {reason}")]
    CgroupRoot { hook: String, reason: String },
}

/// An error and its sources, `: `-separated (aya's syscall errors keep the errno in theirs).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// The syscall that attaches a program at `hook`.
pub(super) fn attach_syscall(hook: &Hook) -> &'static str {
    match hook {
        Hook::TracePoint { .. } => "perf_event_open",
        Hook::Cgroup { .. } => "bpf(BPF_LINK_CREATE)",
        Hook::FEntry { .. } | Hook::FExit { .. } | Hook::BtfTracePoint { .. } => {
            "bpf(BPF_RAW_TRACEPOINT_OPEN)"
        }
    }
}

/// Why a capability has no program attached.
#[derive(Debug, thiserror::Error)]
pub enum Unattached {
    #[error("{WITHOUT_REASON}")]
    LeftOut,
    #[error("no attach rule for this kernel version")]
    NoRule,
    #[error(transparent)]
    Failed(Box<AttachError>),
}

impl AttachError {
    /// One line for the `ready` record: the error with the verifier's own message (its log's
    /// last line that is not a statistic), without the rest of its log.
    pub fn summary(&self) -> String {
        summarize(&self.to_string())
    }
}

/// The instructions the verifier walked to accept the loaded program `name`
/// (`BPF_OBJ_GET_INFO_BY_FD`'s `verified_insns`); `None` before Linux 5.16 or when unread.
pub(crate) fn verified_insns(ebpf: &Ebpf, name: &str) -> Option<u32> {
    ebpf.program(name)?
        .info()
        .ok()?
        .verified_instruction_count()
}

/// `text` cut at aya's "Verifier output:", with the verifier's message in brackets.
fn summarize(text: &str) -> String {
    let Some((head, log)) = text.split_once("Verifier output:") else {
        return text.trim_end().to_owned();
    };
    let statistic = |l: &str| {
        ["processed ", "verification time", "stack depth"]
            .iter()
            .any(|s| l.starts_with(s))
    };
    let message = log
        .lines()
        .map(str::trim)
        .rev()
        .find(|l| !l.is_empty() && !statistic(l));
    match message {
        Some(m) => format!("{} [verifier: {m}]", head.trim_end()),
        None => head.trim_end().to_owned(),
    }
}

/// Loads and attaches one rule's program. A per-packet program's link is returned, owned by
/// the caller (`packet_gate`); every other link stays with its program.
fn attach_one(
    ebpf: &mut Ebpf,
    rule: &attach::AttachRule,
    (btf, cgroup_root): (Option<&aya::Btf>, &CgroupRoot),
) -> Result<Option<PacketLink>, AttachError> {
    let program = ebpf
        .program_mut(rule.program)
        .ok_or(AttachError::NotInObject(rule.program))?;
    let hook = rule.hook.describe();
    let wrong_type = |source| AttachError::WrongType {
        program: rule.program,
        source,
    };
    let load = |source| AttachError::Load {
        hook: hook.clone(),
        source,
    };
    let attach = |error| AttachError::Attach {
        hook: hook.clone(),
        syscall: attach_syscall(&rule.hook),
        error,
    };
    let gated = packet_gate::per_packet(rule.capability, &rule.hook);
    match rule.hook {
        Hook::TracePoint { category, name } => {
            let tp: &mut TracePoint = program.try_into().map_err(wrong_type)?;
            tp.load().map_err(load)?;
            if !gated {
                tp.attach(category, name).map_err(attach)?;
            }
        }
        Hook::FEntry { function } => {
            let p: &mut FEntry = program.try_into().map_err(wrong_type)?;
            p.load(function, btf.ok_or(AttachError::NoBtf)?)
                .map_err(load)?;
            p.attach().map_err(attach)?;
        }
        Hook::BtfTracePoint { name } => {
            let p: &mut BtfTracePoint = program.try_into().map_err(wrong_type)?;
            p.load(name, btf.ok_or(AttachError::NoBtf)?).map_err(load)?;
            if !gated {
                p.attach().map_err(attach)?;
            }
        }
        Hook::FExit { function } => {
            let p: &mut FExit = program.try_into().map_err(wrong_type)?;
            p.load(function, btf.ok_or(AttachError::NoBtf)?)
                .map_err(load)?;
            p.attach().map_err(attach)?;
        }
        Hook::Cgroup { .. } => {
            // The attach type (connect4, connect6) is the program's section's.
            let p: &mut CgroupSockAddr = program.try_into().map_err(wrong_type)?;
            let root = cgroup_root
                .get()
                .map_err(|reason| AttachError::CgroupRoot {
                    hook: hook.clone(),
                    reason,
                })?;
            p.load().map_err(load)?;
            // A link (5.7+): always one of many on the cgroup, detached when conntrace exits.
            // EPERM: a legacy single-program attach holds the hook.
            p.attach(root, CgroupAttachMode::Single).map_err(attach)?;
        }
    }
    if gated {
        return packet_gate::link(ebpf, rule.program, rule.hook).map(Some);
    }
    Ok(None)
}

/// The root cgroup's directory, opened the first time a cgroup hook needs it (once for all).
#[derive(Default)]
struct CgroupRoot(std::cell::OnceCell<Result<std::fs::File, String>>);

impl CgroupRoot {
    /// A descriptor of the root cgroup (the link holds its own reference), or why there is
    /// none.
    fn get(&self) -> Result<std::os::fd::BorrowedFd<'_>, String> {
        use std::os::fd::AsFd;
        match self
            .0
            .get_or_init(|| super::cgroup::open_root().map_err(|e| e.to_string()))
        {
            Ok(file) => Ok(file.as_fd()),
            Err(reason) => Err(reason.clone()),
        }
    }
}

/// What [`attach_all`] attached.
pub(super) struct Attached {
    pub active: Vec<ActiveProgram>,
    /// The rules that did not attach, with the reason.
    pub unavailable: Vec<Unavailable>,
    /// Capabilities another capability's program serves (not attached themselves: they would
    /// report the same fact twice), with that program's attach point (`Hook::describe`).
    pub shared: Vec<(Capability, String)>,
    /// The per-packet SYN-cookie program's gate, when that is the one attached.
    pub gate: Option<PacketGate>,
}

/// Walks the attach table for this kernel. Within a capability every rule of the best
/// priority that works stays attached (a capability may need several hooks, e.g. syscall
/// entry and exit); lower-priority rules are tried only when the better ones all failed.
/// `refused`: programs this kernel cannot run correctly (its layout differs from the one they
/// were built for), with the reason; they are skipped like a rule that failed.
pub(super) fn attach_all(
    ebpf: &mut Ebpf,
    kernel: (u32, u32),
    opts: &TracerOptions,
    btf: Option<&aya::Btf>,
    refused: &[(&'static str, &'static str)],
) -> Result<Attached, LoadError> {
    let plan = attach::plan(kernel, opts.mode, opts.follow);
    let (mut active, mut unavailable) = (Vec::new(), Vec::<Unavailable>::new());
    let mut shared = Vec::new();
    let mut served: Option<(Capability, u8)> = None;
    let mut first_error: Option<(Capability, AttachError)> = None;
    let mut gate = None;
    // The hooks attached so far, by capability.
    let mut hooks = Vec::new();
    let cgroup_root = CgroupRoot::default();
    for rule in &plan {
        if served.is_some_and(|(cap, prio)| cap == rule.capability && prio < rule.priority) {
            continue;
        }
        let row = |reason: String| Unavailable {
            capability: rule.capability,
            name: rule.program,
            attach: rule.hook.describe(),
            reason,
        };
        if opts.without.contains(&rule.capability) {
            if !unavailable.iter().any(|u| u.capability == rule.capability) {
                unavailable.push(row(WITHOUT_REASON.to_owned()));
            }
            continue;
        }
        if let Some(by) = attach::served_by(rule.capability, &hooks) {
            debug!(program = rule.program, served_by = %by.describe(), "not attached: served");
            if !shared.iter().any(|(c, _)| *c == rule.capability) {
                shared.push((rule.capability, by.describe()));
            }
            continue;
        }
        if let Some((_, why)) = refused.iter().find(|(p, _)| *p == rule.program) {
            debug!(
                program = rule.program,
                reason = why,
                "not attached, falling back"
            );
            unavailable.push(row((*why).to_owned()));
            continue;
        }
        match attach_one(ebpf, rule, (btf, &cgroup_root)) {
            Ok(link) => {
                if let Some(link) = link {
                    gate = Some(PacketGate::new(rule.program, rule.hook, link));
                }
                debug!(program = rule.program, attach = %rule.hook.describe(), "attached");
                served = Some((rule.capability, rule.priority));
                hooks.push((rule.capability, rule.hook));
                active.push(ActiveProgram {
                    capability: rule.capability,
                    name: rule.program,
                    attach: rule.hook.describe(),
                    verified_insns: verified_insns(ebpf, rule.program),
                });
            }
            Err(error) => {
                if rule.hook.in_tracepoints_mode() {
                    warn!(program = rule.program, reason = %error.summary(), "not attached");
                } else {
                    // A trampoline or tp_btf program that fails leaves its capability to the
                    // tracepoint rows.
                    debug!(program = rule.program, reason = %error.summary(), "not attached, falling back");
                }
                debug!(program = rule.program, "{error}");
                unavailable.push(row(error.summary()));
                if first_error
                    .as_ref()
                    .is_none_or(|(c, _)| *c != rule.capability)
                {
                    first_error = Some((rule.capability, error));
                }
            }
        }
    }
    for rule in plan.iter().filter(|r| r.required) {
        if !active.iter().any(|a| a.capability == rule.capability) {
            let cause = match first_error {
                _ if opts.without.contains(&rule.capability) => Unattached::LeftOut,
                Some((c, e)) if c == rule.capability => Unattached::Failed(Box::new(e)),
                _ => Unattached::NoRule,
            };
            return Err(LoadError::Required {
                capability: rule.capability,
                cause,
            });
        }
    }
    Ok(Attached {
        active,
        unavailable,
        shared,
        gate,
    })
}

#[cfg(test)]
mod tests {
    use super::summarize;

    #[test]
    fn a_load_errors_summary_keeps_the_verifiers_message_not_its_statistics() {
        let text = "bpf(BPF_PROG_LOAD) tracepoint:skb:kfree_skb: the BPF_PROG_LOAD syscall returned Argument list too long (os error 7). Verifier output: BPF program is too large. Processed 1000001 insn\nprocessed 1000001 insns (limit 1000000) max_states_per_insn 30 total_states 52044 peak_states 3881 mark_read 217\nstack depth 256+0\n";
        assert_eq!(
            summarize(text),
            "bpf(BPF_PROG_LOAD) tracepoint:skb:kfree_skb: the BPF_PROG_LOAD syscall returned Argument list too long (os error 7). [verifier: BPF program is too large. Processed 1000001 insn]"
        );
        assert_eq!(
            summarize("attach x: no such file\n"),
            "attach x: no such file"
        );
        assert_eq!(
            summarize("load: denied. Verifier output: \nprocessed 3 insns\n"),
            "load: denied."
        );
    }
}

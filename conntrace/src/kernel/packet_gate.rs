//! The per-packet SYN-cookie program, attached only while it can see something.
//!
//! Where no cookie function can be hooked (no fentry: this project's host), SYN cookies are
//! seen at `net:net_dev_queue`, which the kernel calls for every packet this host sends: about
//! eight runs per connection on any port, and one per packet of bulk traffic. Only a listener
//! ever answers a SYN with a cookie, so with `--port` the program needs to be attached only
//! while a listener of a traced port exists in some network namespace. Userspace
//! (`run::listening`) decides; this module holds the program's link and makes or drops it.
//!
//! The link is owned here (aya's `take_link`): dropping it detaches the program, which stays
//! loaded, so attaching again is one `bpf(BPF_RAW_TRACEPOINT_OPEN)` or `perf_event_open` and
//! no verifier run.

use aya::{
    Ebpf,
    programs::{BtfTracePoint, TracePoint, tp_btf::BtfTracePointLink, trace_point::TracePointLink},
};

use super::{
    attach::{Capability, Hook},
    hooks::AttachError,
};

/// The link of an attached per-packet program; dropping it detaches the program.
#[derive(Debug)]
#[expect(
    dead_code,
    reason = "held only for its Drop, which detaches the program"
)]
pub enum PacketLink {
    Classic(TracePointLink),
    Btf(BtfTracePointLink),
}

/// Whether the program of capability `capability` at `hook` runs for every packet (and so
/// may be detached while nothing it looks for can happen).
pub fn per_packet(capability: Capability, hook: &Hook) -> bool {
    capability == Capability::SynCookies
        && matches!(hook, Hook::TracePoint { .. } | Hook::BtfTracePoint { .. })
}

/// The per-packet SYN-cookie program: its name, hook and link (`None`: detached).
#[derive(Debug)]
pub struct PacketGate {
    program: &'static str,
    hook: Hook,
    link: Option<PacketLink>,
}

impl PacketGate {
    /// The gate of a program attached at start-up, with its link.
    pub fn new(program: &'static str, hook: Hook, link: PacketLink) -> Self {
        Self {
            program,
            hook,
            link: Some(link),
        }
    }

    pub fn program(&self) -> &'static str {
        self.program
    }

    pub fn attached(&self) -> bool {
        self.link.is_some()
    }

    /// Attaches (`on`) or detaches the program; nothing when it already is. Errors name the
    /// syscall that failed; the program is then left detached.
    pub fn set(&mut self, ebpf: &mut Ebpf, on: bool) -> Result<(), AttachError> {
        if !on {
            // Dropping the link closes its file: the kernel detaches the program.
            self.link = None;
            return Ok(());
        }
        if self.link.is_some() {
            return Ok(());
        }
        self.link = Some(link(ebpf, self.program, self.hook)?);
        Ok(())
    }
}

/// Attaches the loaded per-packet `program` at `hook` and takes its link (the one place this
/// is done: at start-up, `hooks::attach_one`, and each time the gate opens).
pub fn link(ebpf: &mut Ebpf, program: &'static str, hook: Hook) -> Result<PacketLink, AttachError> {
    let p = ebpf
        .program_mut(program)
        .ok_or(AttachError::NotInObject(program))?;
    let wrong_type = |source| AttachError::WrongType { program, source };
    let attach = |error| AttachError::Attach {
        hook: hook.describe(),
        syscall: super::hooks::attach_syscall(&hook),
        error,
    };
    match hook {
        Hook::TracePoint { category, name } => {
            let tp: &mut TracePoint = p.try_into().map_err(wrong_type)?;
            let id = tp.attach(category, name).map_err(attach)?;
            Ok(PacketLink::Classic(tp.take_link(id).map_err(attach)?))
        }
        Hook::BtfTracePoint { .. } => {
            let tp: &mut BtfTracePoint = p.try_into().map_err(wrong_type)?;
            let id = tp.attach().map_err(attach)?;
            Ok(PacketLink::Btf(tp.take_link(id).map_err(attach)?))
        }
        Hook::FEntry { .. } | Hook::FExit { .. } | Hook::Cgroup { .. } => {
            Err(AttachError::NotPerPacket(program))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_cookie_programs_at_tracepoints_are_per_packet() {
        let ndq = Hook::BtfTracePoint {
            name: "net_dev_queue",
        };
        assert!(per_packet(Capability::SynCookies, &ndq));
        let classic = Hook::TracePoint {
            category: "net",
            name: "net_dev_queue",
        };
        assert!(per_packet(Capability::SynCookies, &classic));
        let fentry = Hook::FEntry {
            function: "cookie_v4_init_sequence",
        };
        assert!(!per_packet(Capability::SynCookies, &fentry));
        assert!(!per_packet(Capability::Drops, &ndq));
    }
}

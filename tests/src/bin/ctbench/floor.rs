//! The `floor` and `floor-unrelated` modes: an empty eBPF program (`r0 = 0; exit`) on each
//! hook conntrace attached, as its `ready` record lists them. What any program at all costs
//! on those hooks here, with none of conntrace's work: the kernel's dispatch of each run (the
//! tracepoint's call, the run's bookkeeping, and on this project's hosts the retpolines and
//! return thunks around every indirect call and return). conntrace's ratio cannot exceed its
//! floor's, whatever its programs do.
//!
//! `floor` has every hook, as conntrace has them while tracing the churned port (whose
//! listener keeps the per-packet SYN-cookie program attached); `floor-unrelated` leaves out
//! what conntrace attaches only while a traced port has a listener (conntrace's
//! `kernel/packet_gate.rs`), as tracing another port, which has none. A root cgroup `connect`
//! hook gets an empty program that allows (returns 1). An iterator (`iter:`)
//! runs only when read, so it has no floor; kprobes are not loaded here (the bench's hosts
//! have none), and either is named in a line when conntrace lists one.

use std::{cell::OnceCell, os::fd::OwnedFd};

use conntrace_tests::bpf_sys::{
    self, BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT, BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
    BPF_PROG_TYPE_TRACEPOINT, BPF_PROG_TYPE_TRACING, BPF_TRACE_FENTRY, BPF_TRACE_FEXIT,
    BPF_TRACE_RAW_TP,
};

use super::btf::Btf;

/// The capability whose per-packet program conntrace attaches only while a listener of a
/// traced port exists (`packet_gate::per_packet`): its tracepoint or tp_btf form; a cookie
/// function's fentry stays attached.
const LISTENER_GATED: &str = "syn_cookies";

/// Where an empty program goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// A BTF-typed kind (tp_btf, fentry, fexit): its attach type and the BTF id it names.
    Tracing { attach_type: u32, btf_id: u32 },
    /// A classic tracepoint, through a perf event.
    Classic { category: String, name: String },
    /// A root cgroup `connect4`/`connect6` hook (its attach type): an empty program there
    /// returns 1, allowing every `connect()` as conntrace's does.
    Cgroup { attach_type: u32 },
}

/// One hook of conntrace's `ready` record.
#[derive(Debug, Clone)]
struct Hook {
    /// As conntrace wrote it, e.g. `tp_btf:inet_sock_set_state`.
    attach: String,
    capability: String,
    target: Target,
}

impl Hook {
    /// Whether conntrace attaches this hook's program only while a traced port has a
    /// listener: `floor-unrelated` leaves it out.
    fn listener_gated(&self) -> bool {
        self.capability == LISTENER_GATED
            && match self.target {
                Target::Classic { .. } => true,
                Target::Tracing { attach_type, .. } => attach_type == BPF_TRACE_RAW_TP,
                Target::Cgroup { .. } => false,
            }
    }
}

/// The kernel's BTF, read (through bpftool) the first time a BTF-typed hook needs it: classic
/// tracepoints have a floor without it.
#[derive(Default)]
struct LazyBtf(OnceCell<Result<Btf, String>>);

impl LazyBtf {
    fn get(&self) -> Result<&Btf, String> {
        self.0.get_or_init(Btf::load).as_ref().map_err(Clone::clone)
    }
}

/// The hooks an empty program goes on, in `ready` order.
pub struct Floor {
    hooks: Vec<Hook>,
}

/// Empty programs attached; dropping this detaches and unloads them.
pub struct Attached {
    _fds: Vec<OwnedFd>,
}

/// The hook kinds whose target is named by a BTF id.
const TYPED_KINDS: [&str; 4] = ["tp_btf", "btf_tracepoint", "fentry", "fexit"];

/// The target of conntrace's `attach` (`Hook::describe` in conntrace/src/kernel/attach.rs),
/// or why an empty program does not go there.
fn target(btf: &LazyBtf, attach: &str) -> Result<Target, String> {
    let (kind, rest) = attach
        .split_once(':')
        .ok_or_else(|| format!("`{attach}` is not KIND:TARGET"))?;
    let tracing = |attach_type, kind: &str, name: &str| {
        btf.get()?
            .id(kind, name)
            .map(|btf_id| Target::Tracing {
                attach_type,
                btf_id,
            })
            .ok_or_else(|| format!("the kernel's BTF has no {kind} `{name}`"))
    };
    match kind {
        "tp_btf" | "btf_tracepoint" => {
            tracing(BPF_TRACE_RAW_TP, "TYPEDEF", &format!("btf_trace_{rest}"))
        }
        "fentry" => tracing(BPF_TRACE_FENTRY, "FUNC", rest),
        "fexit" => tracing(BPF_TRACE_FEXIT, "FUNC", rest),
        "tracepoint" => {
            let (category, name) = rest
                .split_once(':')
                .ok_or_else(|| format!("`{attach}` is not tracepoint:CATEGORY:NAME"))?;
            Ok(Target::Classic {
                category: category.to_owned(),
                name: name.to_owned(),
            })
        }
        "cgroup" if conntrace_tests::cgroup::cgroup2_mount().is_none() => Err(
            "no cgroup v2 hierarchy mounted (conntrace mounts one briefly; the floor does not)"
                .to_owned(),
        ),
        "cgroup" => match rest {
            "connect4" => Ok(Target::Cgroup {
                attach_type: BPF_CGROUP_INET4_CONNECT,
            }),
            "connect6" => Ok(Target::Cgroup {
                attach_type: BPF_CGROUP_INET6_CONNECT,
            }),
            other => Err(format!("no empty program for cgroup hook `{other}` here")),
        },
        "iter" => Err("an iterator runs only when read: no floor".to_owned()),
        other => Err(format!("no empty program for `{other}` hooks here")),
    }
}

impl Floor {
    /// The hooks of conntrace's `ready` record (its `programs`): attaches an empty program
    /// on each once to check that the kernel takes them, and prints the plan and any hook
    /// left out.
    pub fn prepare(programs: &[serde_json::Value]) -> Result<Self, String> {
        let btf = LazyBtf::default();
        // A floor without the BTF-typed hooks would be no floor: the kernel's BTF is needed
        // then, and only then (classic tracepoints are found in tracefs).
        let typed = |attach: &str| {
            attach
                .split_once(':')
                .is_some_and(|(kind, _)| TYPED_KINDS.contains(&kind))
        };
        if programs
            .iter()
            .any(|p| p["attach"].as_str().is_some_and(typed))
        {
            btf.get()?;
        }
        let mut hooks = Vec::new();
        for program in programs {
            let (Some(attach), Some(capability)) =
                (program["attach"].as_str(), program["capability"].as_str())
            else {
                continue;
            };
            match target(&btf, attach) {
                Ok(target) => hooks.push(Hook {
                    attach: attach.to_owned(),
                    capability: capability.to_owned(),
                    target,
                }),
                Err(why) => println!("floor: left out {attach}: {why}"),
            }
        }
        if hooks.is_empty() {
            return Err("conntrace listed no hook an empty program goes on".to_owned());
        }
        let floor = Self { hooks };
        drop(floor.attach(false)?);
        let names = |unrelated| {
            floor
                .chosen(unrelated)
                .map(|h| h.attach.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!("floor: an empty program on each of {}", names(false));
        println!(
            "floor-unrelated: the same without the listener-gated ones: {}",
            names(true)
        );
        Ok(floor)
    }

    /// The hooks of one mode: all, or (`unrelated`) those conntrace keeps attached while no
    /// traced port has a listener.
    fn chosen(&self, unrelated: bool) -> impl Iterator<Item = &Hook> {
        self.hooks
            .iter()
            .filter(move |h| !(unrelated && h.listener_gated()))
    }

    /// Loads and attaches the empty programs of one mode (see [`Floor::chosen`]); an error
    /// names the hook and the syscall that refused it.
    pub fn attach(&self, unrelated: bool) -> Result<Attached, String> {
        let mut fds = Vec::new();
        for hook in self.chosen(unrelated) {
            let (prog, link) =
                attach_one(&hook.target).map_err(|e| format!("{}: {e}", hook.attach))?;
            fds.extend([prog, link]);
        }
        Ok(Attached { _fds: fds })
    }
}

/// One empty program at `target`: the program's descriptor and the one that holds its
/// attachment.
fn attach_one(target: &Target) -> Result<(OwnedFd, OwnedFd), String> {
    let (prog_type, expected_attach_type, attach_btf_id) = match target {
        Target::Tracing {
            attach_type,
            btf_id,
        } => (BPF_PROG_TYPE_TRACING, *attach_type, *btf_id),
        Target::Classic { .. } => (BPF_PROG_TYPE_TRACEPOINT, 0, 0),
        Target::Cgroup { attach_type } => (BPF_PROG_TYPE_CGROUP_SOCK_ADDR, *attach_type, 0),
    };
    // A cgroup `connect` program allows by returning 1; a tracing program's 0 is ignored.
    let returns = i32::from(matches!(target, Target::Cgroup { .. }));
    let prog = bpf_sys::load(&bpf_sys::Load {
        prog_type,
        returns,
        expected_attach_type,
        attach_btf_id,
        name: "ct_floor",
    })?;
    let link = match target {
        Target::Tracing { .. } => bpf_sys::raw_tracepoint_open(&prog)?,
        Target::Classic { category, name } => {
            bpf_sys::perf_tracepoint_attach(&prog, category, name)?
        }
        Target::Cgroup { attach_type } => {
            let root =
                conntrace_tests::cgroup::cgroup2_mount().ok_or("no cgroup v2 hierarchy mounted")?;
            let dir = std::fs::File::open(&root).map_err(|e| format!("{}: {e}", root.display()))?;
            bpf_sys::link_create(&prog, &dir, *attach_type)?
        }
    };
    Ok((prog, link))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_hook_has_its_target_or_a_reason() {
        let btf = LazyBtf(OnceCell::from(Ok(Btf::parse(
            "[11] FUNC 'tcp_connect' type_id=10 linkage=static\n\
             [12] TYPEDEF 'btf_trace_inet_sock_set_state' type_id=13\n",
        ))));
        assert_eq!(
            target(&btf, "tp_btf:inet_sock_set_state"),
            Ok(Target::Tracing {
                attach_type: BPF_TRACE_RAW_TP,
                btf_id: 12
            })
        );
        assert_eq!(
            target(&btf, "fexit:tcp_connect"),
            Ok(Target::Tracing {
                attach_type: BPF_TRACE_FEXIT,
                btf_id: 11
            })
        );
        assert_eq!(
            target(&btf, "tracepoint:tcp:tcp_send_reset"),
            Ok(Target::Classic {
                category: "tcp".into(),
                name: "tcp_send_reset".into()
            })
        );
        assert!(
            target(&btf, "tp_btf:kfree_skb")
                .unwrap_err()
                .contains("btf_trace_kfree_skb")
        );
        assert!(
            target(&btf, "iter:tcp")
                .unwrap_err()
                .contains("only when read")
        );
        assert!(target(&btf, "kprobe:tcp_connect").is_err());
        assert_eq!(
            target(&btf, "cgroup:connect6"),
            Ok(Target::Cgroup {
                attach_type: BPF_CGROUP_INET6_CONNECT
            })
        );
        assert!(target(&btf, "cgroup:sendmsg4").is_err());
    }

    #[test]
    fn a_classic_hook_needs_no_btf() {
        let btf = LazyBtf(OnceCell::from(Err("bpftool: not found".to_owned())));
        assert!(target(&btf, "tracepoint:tcp:tcp_send_reset").is_ok());
        assert!(
            target(&btf, "tp_btf:kfree_skb")
                .unwrap_err()
                .contains("bpftool: not found")
        );
    }

    #[test]
    fn only_the_per_packet_cookie_program_is_listener_gated() {
        let hook = |capability: &str, target| Hook {
            attach: String::new(),
            capability: capability.to_owned(),
            target,
        };
        let tracing = |attach_type| Target::Tracing {
            attach_type,
            btf_id: 1,
        };
        let classic = Target::Classic {
            category: "net".into(),
            name: "net_dev_queue".into(),
        };
        assert!(hook("syn_cookies", tracing(BPF_TRACE_RAW_TP)).listener_gated());
        assert!(hook("syn_cookies", classic.clone()).listener_gated());
        assert!(!hook("syn_cookies", tracing(BPF_TRACE_FENTRY)).listener_gated());
        assert!(!hook("drops", tracing(BPF_TRACE_RAW_TP)).listener_gated());
        assert!(!hook("resets", classic).listener_gated());
        let cgroup = Target::Cgroup {
            attach_type: BPF_CGROUP_INET4_CONNECT,
        };
        assert!(!hook("connect_denied", cgroup).listener_gated());
    }
}

//! The `bpftrace-hooks` peer: one bpftrace probe on each hook conntrace attached, as its `ready`
//! record lists them, each counting its runs per hook (`@hits[probe] = count()`) and, where the
//! hook's arguments carry ports, filtered by the traced port in the kernel as conntrace's
//! programs are. It follows whatever hooks conntrace reports at run time: classic tracepoints,
//! fentry/fexit (bpftrace's kfunc/kretfunc), raw (BTF) tracepoints and kprobes. This module
//! writes the script; bpftrace.rs runs it, and leaves out a hook bpftrace cannot attach.

use std::path::{Path, PathBuf};

use super::btf::{Btf, Param};

/// A hook as a bpftrace probe type and target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Tracepoint { category: String, name: String },
    FEntry(String),
    FExit(String),
    RawTracepoint(String),
    KProbe(String),
    KRetProbe(String),
}

impl Kind {
    /// Parses conntrace's attach description (`Hook::describe` in conntrace/src/kernel/attach.rs):
    /// `tracepoint:CATEGORY:NAME`, `fentry:FUNCTION`, `fexit:FUNCTION`, `rawtracepoint:NAME`
    /// (or `raw_tracepoint:`, `tp_btf:`, `btf_tracepoint:`), `kprobe:` and `kretprobe:FUNCTION`.
    pub fn parse(attach: &str) -> Result<Self, String> {
        let (kind, target) = attach
            .split_once(':')
            .filter(|(_, t)| !t.is_empty())
            .ok_or_else(|| format!("`{attach}` is not KIND:TARGET"))?;
        let target = target.to_owned();
        Ok(match kind {
            "tracepoint" => {
                let (category, name) = target
                    .split_once(':')
                    .ok_or_else(|| format!("`{attach}` is not tracepoint:CATEGORY:NAME"))?;
                Self::Tracepoint {
                    category: category.to_owned(),
                    name: name.to_owned(),
                }
            }
            "fentry" => Self::FEntry(target),
            "fexit" => Self::FExit(target),
            "rawtracepoint" | "raw_tracepoint" | "tp_btf" | "btf_tracepoint" => {
                Self::RawTracepoint(target)
            }
            "kprobe" => Self::KProbe(target),
            "kretprobe" => Self::KRetProbe(target),
            other => return Err(format!("bpftrace has no probe type for `{other}` hooks")),
        })
    }

    /// The attach point as bpftrace spells it (kfunc/kretfunc: the names bpftrace has accepted
    /// for fentry/fexit since 0.12).
    pub fn point(&self) -> String {
        match self {
            Self::Tracepoint { category, name } => format!("tracepoint:{category}:{name}"),
            Self::FEntry(f) => format!("kfunc:{f}"),
            Self::FExit(f) => format!("kretfunc:{f}"),
            Self::RawTracepoint(n) => format!("rawtracepoint:{n}"),
            Self::KProbe(f) => format!("kprobe:{f}"),
            Self::KRetProbe(f) => format!("kretprobe:{f}"),
        }
    }
}

/// How a probe sees the connection's ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortAccess {
    /// The tracepoint's own `sport` and `dport` fields (host order).
    Fields,
    /// A bpftrace expression for the event's `struct sock *`.
    Sock(String),
    /// Nothing carries a port: every run is counted.
    Unfiltered,
}

/// One probe of the script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// conntrace's attach description.
    pub attach: String,
    pub kind: Kind,
    pub port: PortAccess,
}

impl Hook {
    /// The probe, on one line.
    pub fn probe(&self, port: u16) -> String {
        // skc_dport is in network order; bpftrace reads it as a host-order u16.
        let be = port.to_be();
        let filter = match &self.port {
            PortAccess::Fields => format!(" /args->sport == {port} || args->dport == {port}/"),
            PortAccess::Sock(sk) => format!(
                " /{sk}->__sk_common.skc_num == {port} || {sk}->__sk_common.skc_dport == {be}/"
            ),
            PortAccess::Unfiltered => String::new(),
        };
        format!(
            "{}{filter} {{ @hits[probe] = count(); }}",
            self.kind.point()
        )
    }
}

/// The whole script: one probe per hook, one per line.
pub fn script(hooks: &[Hook], port: u16) -> String {
    hooks.iter().map(|h| h.probe(port) + "\n").collect()
}

/// A tracepoint's port access from its fields (type, name), as its `format` file lists them:
/// `sport` and `dport`, else the socket's address (`skaddr`, `sk`), else none.
pub fn tracepoint_access(fields: &[(String, String)]) -> PortAccess {
    let has = |name: &str| fields.iter().any(|(_, n)| n == name);
    if has("sport") && has("dport") {
        return PortAccess::Fields;
    }
    fields
        .iter()
        .find(|(ty, n)| ty.contains('*') && (n == "skaddr" || n == "sk"))
        .map_or(PortAccess::Unfiltered, |(_, n)| {
            PortAccess::Sock(format!("((struct sock *)args->{n})"))
        })
}

/// A typed hook's port access: its first `struct sock *` or `struct socket *` parameter, named
/// by `spell` (argument index and parameter → bpftrace expression; `None` if it cannot be).
pub fn param_access(
    params: &[Param],
    spell: impl Fn(usize, &Param) -> Option<String>,
) -> PortAccess {
    for (i, p) in params.iter().enumerate() {
        let ty = p.ty.trim_start_matches("const ");
        let Some(arg) = spell(i, p) else { continue };
        match ty {
            "struct sock *" => return PortAccess::Sock(format!("((struct sock *){arg})")),
            "struct socket *" => return PortAccess::Sock(format!("((struct socket *){arg})->sk")),
            _ => {}
        }
    }
    PortAccess::Unfiltered
}

fn tracefs() -> PathBuf {
    let tracing = Path::new("/sys/kernel/tracing");
    if tracing.join("events").exists() {
        tracing.to_owned()
    } else {
        PathBuf::from("/sys/kernel/debug/tracing")
    }
}

/// The fields (type, name) of a tracepoint's `format` file, without the common ones.
fn tracepoint_fields(category: &str, name: &str) -> Result<Vec<(String, String)>, String> {
    let path = tracefs().join(format!("events/{category}/{name}/format"));
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(format_fields(&text))
}

/// The fields (type, name) a tracepoint `format` file lists, without the common ones.
fn format_fields(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("field:")?.split(';').next())
        .filter_map(|decl| {
            // `const void * skaddr`, `__u8 saddr[4]`, `__data_loc char[] name`.
            let (ty, last) = decl.trim().rsplit_once(' ')?;
            let name = last.trim_start_matches('*');
            let name = name.split('[').next().unwrap_or(name);
            let stars = &last[..last.len() - last.trim_start_matches('*').len()];
            let ty = format!("{} {stars}", ty.trim()).trim().to_owned();
            (!name.starts_with("common_")).then(|| (ty, name.to_owned()))
        })
        .collect()
}

/// For a raw (BTF) tracepoint hook, the classic tracepoint of the same name (its category
/// found in tracefs): the same site in the kernel, for a bpftrace without raw tracepoints
/// (before 0.20). The classic one also builds the trace record on every run.
pub fn classic_twin(hook: &Hook) -> Option<Hook> {
    let Kind::RawTracepoint(name) = &hook.kind else {
        return None;
    };
    let events = std::fs::read_dir(tracefs().join("events")).ok()?;
    let category = events
        .filter_map(Result::ok)
        .find(|e| e.path().join(name).join("format").exists())?
        .file_name()
        .into_string()
        .ok()?;
    let fields = tracepoint_fields(&category, name).ok()?;
    Some(Hook {
        attach: hook.attach.clone(),
        kind: Kind::Tracepoint {
            category,
            name: name.clone(),
        },
        port: tracepoint_access(&fields),
    })
}

/// The hooks to probe for conntrace's attach descriptions (each once, in order), and a line
/// for each one left out saying why.
pub fn plan(attaches: &[String]) -> (Vec<Hook>, Vec<String>) {
    let mut btf: Option<Result<Btf, String>> = None;
    let mut hooks: Vec<Hook> = Vec::new();
    let mut left_out = Vec::new();
    for attach in attaches {
        if hooks.iter().any(|h| &h.attach == attach) {
            continue;
        }
        let kind = match Kind::parse(attach) {
            Ok(kind) => kind,
            Err(why) => {
                left_out.push(format!("{attach}: {why}"));
                continue;
            }
        };
        let mut typed =
            |params: fn(&Btf, &str) -> Option<Vec<Param>>, target: &str, named: bool| {
                let btf = btf.get_or_insert_with(Btf::load).as_ref().ok()?;
                let params = params(btf, target)?;
                Some(param_access(&params, |i, p| {
                    if named {
                        (!p.name.is_empty()).then(|| format!("args->{}", p.name))
                    } else {
                        Some(format!("arg{i}"))
                    }
                }))
            };
        let port = match &kind {
            Kind::Tracepoint { category, name } => match tracepoint_fields(category, name) {
                Ok(fields) => Some(tracepoint_access(&fields)),
                Err(why) => {
                    left_out.push(format!("{attach}: no tracepoint format: {why}"));
                    continue;
                }
            },
            Kind::FEntry(f) | Kind::FExit(f) => typed(Btf::function_params, f, true),
            Kind::KProbe(f) => typed(Btf::function_params, f, false),
            Kind::RawTracepoint(n) => typed(Btf::tracepoint_params, n, false),
            Kind::KRetProbe(_) => Some(PortAccess::Unfiltered),
        }
        .unwrap_or(PortAccess::Unfiltered);
        hooks.push(Hook {
            attach: attach.clone(),
            kind,
            port,
        });
    }
    if let Some(Err(why)) = btf {
        left_out.push(format!("(typed hooks counted unfiltered: no BTF: {why})"));
    }
    (hooks, left_out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(attach: &str, port: PortAccess) -> Hook {
        Hook {
            attach: attach.to_owned(),
            kind: Kind::parse(attach).expect("attach description"),
            port,
        }
    }

    #[test]
    fn one_probe_per_hook_filtered_where_the_hook_carries_ports() {
        let hooks = [
            hook("tracepoint:sock:inet_sock_set_state", PortAccess::Fields),
            hook(
                "tracepoint:sock:sk_data_ready",
                PortAccess::Sock("((struct sock *)args->skaddr)".into()),
            ),
            hook(
                "tracepoint:syscalls:sys_enter_connect",
                PortAccess::Unfiltered,
            ),
            hook(
                "fexit:inet_stream_connect",
                PortAccess::Sock("((struct socket *)args->sock)->sk".into()),
            ),
            hook("fentry:cookie_v4_init_sequence", PortAccess::Unfiltered),
            hook(
                "tp_btf:kfree_skb",
                PortAccess::Sock("((struct sock *)arg3)".into()),
            ),
            hook("rawtracepoint:net_dev_queue", PortAccess::Unfiltered),
        ];
        assert_eq!(
            script(&hooks, 3306),
            "tracepoint:sock:inet_sock_set_state /args->sport == 3306 || args->dport == 3306/ { @hits[probe] = count(); }
tracepoint:sock:sk_data_ready /((struct sock *)args->skaddr)->__sk_common.skc_num == 3306 || ((struct sock *)args->skaddr)->__sk_common.skc_dport == 59916/ { @hits[probe] = count(); }
tracepoint:syscalls:sys_enter_connect { @hits[probe] = count(); }
kretfunc:inet_stream_connect /((struct socket *)args->sock)->sk->__sk_common.skc_num == 3306 || ((struct socket *)args->sock)->sk->__sk_common.skc_dport == 59916/ { @hits[probe] = count(); }
kfunc:cookie_v4_init_sequence { @hits[probe] = count(); }
rawtracepoint:kfree_skb /((struct sock *)arg3)->__sk_common.skc_num == 3306 || ((struct sock *)arg3)->__sk_common.skc_dport == 59916/ { @hits[probe] = count(); }
rawtracepoint:net_dev_queue { @hits[probe] = count(); }
"
        );
    }

    #[test]
    fn attach_descriptions() {
        assert_eq!(
            Kind::parse("tracepoint:tcp:tcp_send_reset").map(|k| k.point()),
            Ok("tracepoint:tcp:tcp_send_reset".to_owned())
        );
        assert_eq!(
            Kind::parse("fexit:tcp_sendmsg").map(|k| k.point()),
            Ok("kretfunc:tcp_sendmsg".to_owned())
        );
        for raw in [
            "rawtracepoint:x",
            "raw_tracepoint:x",
            "tp_btf:x",
            "btf_tracepoint:x",
        ] {
            assert_eq!(Kind::parse(raw), Ok(Kind::RawTracepoint("x".into())));
        }
        assert_eq!(
            Kind::parse("iter:tcp"),
            Err("bpftrace has no probe type for `iter` hooks".to_owned())
        );
        assert!(Kind::parse("tracepoint:sock").is_err());
        assert!(Kind::parse("fentry:").is_err());
    }

    #[test]
    fn port_access_from_fields_and_parameters() {
        let fields = |f: &[(&str, &str)]| -> Vec<(String, String)> {
            f.iter()
                .map(|(t, n)| (t.to_string(), n.to_string()))
                .collect()
        };
        assert_eq!(
            tracepoint_access(&fields(&[
                ("const void *", "skaddr"),
                ("__u16", "sport"),
                ("__u16", "dport")
            ])),
            PortAccess::Fields
        );
        assert_eq!(
            tracepoint_access(&fields(&[("void *", "sk"), ("int", "ret")])),
            PortAccess::Sock("((struct sock *)args->sk)".into())
        );
        assert_eq!(
            tracepoint_access(&fields(&[("void *", "skbaddr"), ("void *", "rx_sk")])),
            PortAccess::Unfiltered
        );
        let params = [
            Param {
                name: "skb".into(),
                ty: "struct sk_buff *".into(),
            },
            Param {
                name: "sk".into(),
                ty: "const struct sock *".into(),
            },
        ];
        assert_eq!(
            param_access(&params, |i, _| Some(format!("arg{i}"))),
            PortAccess::Sock("((struct sock *)arg1)".into())
        );
        assert_eq!(
            param_access(&params, |_, p| (p.name != "sk").then(|| p.name.clone())),
            PortAccess::Unfiltered
        );
    }

    #[test]
    fn tracepoint_format_fields() {
        let format = "name: inet_sock_set_state
ID: 1467
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:void *rx_sk;\toffset:40;\tsize:8;\tsigned:0;
\tfield:__data_loc char[] name;\toffset:48;\tsize:4;\tsigned:0;

print fmt: \"family=%s\"
";
        let fields: Vec<(String, String)> = format_fields(format);
        let fields: Vec<(&str, &str)> = fields
            .iter()
            .map(|(t, n)| (t.as_str(), n.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("const void *", "skaddr"),
                ("__u16", "sport"),
                ("__u8", "saddr"),
                ("void *", "rx_sk"),
                ("__data_loc char[]", "name"),
            ]
        );
    }
}

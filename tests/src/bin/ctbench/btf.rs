//! The parameters of kernel functions and BTF tracepoints, read from the kernel's BTF as
//! `bpftool btf dump file /sys/kernel/btf/vmlinux format raw` prints it: enough to know which
//! argument of an fentry/fexit/kprobe or raw-tracepoint hook is the socket.

use std::{collections::HashMap, process::Command};

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// One BTF type: its kind (`PTR`, `STRUCT`, `FUNC_PROTO`, ...), name, referenced type, and a
/// function prototype's parameters.
#[derive(Debug, Default)]
struct Type {
    kind: String,
    name: String,
    type_id: Option<u32>,
    params: Vec<(String, u32)>,
}

/// A parameter: its name (empty when BTF has none) and C type, e.g. `const struct sock *`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    pub name: String,
    pub ty: String,
}

/// The types of one BTF dump, by id, and the ids of functions and typedefs by name.
#[derive(Debug, Default)]
pub struct Btf {
    types: HashMap<u32, Type>,
    by_name: HashMap<(String, String), u32>,
}

impl Btf {
    /// The running kernel's BTF, through bpftool.
    pub fn load() -> Result<Self, String> {
        let out = Command::new("bpftool")
            .args(["btf", "dump", "file", VMLINUX, "format", "raw"])
            .output()
            .map_err(|e| format!("bpftool: {e} (package bpftool)"))?;
        if !out.status.success() {
            return Err(format!(
                "bpftool btf dump {VMLINUX}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self::parse(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Parses `bpftool btf dump ... format raw`: `[ID] KIND 'NAME' type_id=N ...` lines, each
    /// followed by its members or parameters on tab-indented lines.
    pub fn parse(text: &str) -> Self {
        let mut btf = Self::default();
        let mut current: Option<u32> = None;
        for line in text.lines() {
            if let Some(member) = line.strip_prefix('\t') {
                let Some(t) = current.and_then(|id| btf.types.get_mut(&id)) else {
                    continue;
                };
                if t.kind == "FUNC_PROTO" {
                    let name = quoted(member).unwrap_or_default();
                    let name = if name == "(anon)" { "" } else { name };
                    if let Some(id) = number(member, "type_id=") {
                        t.params.push((name.to_owned(), id));
                    }
                }
                continue;
            }
            let Some(rest) = line.strip_prefix('[') else {
                continue;
            };
            let Some((id, rest)) = rest.split_once("] ") else {
                continue;
            };
            let Ok(id) = id.parse::<u32>() else { continue };
            let kind = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            let name = quoted(rest).unwrap_or_default().to_owned();
            if matches!(kind.as_str(), "FUNC" | "TYPEDEF") {
                btf.by_name.insert((kind.clone(), name.clone()), id);
            }
            let type_id = number(rest, " type_id=");
            btf.types.insert(
                id,
                Type {
                    kind,
                    name,
                    type_id,
                    params: Vec::new(),
                },
            );
            current = Some(id);
        }
        btf
    }

    /// The id of the `FUNC` or `TYPEDEF` (`kind`) named `name`: what a tracing program's
    /// `attach_btf_id` names (a function for fentry/fexit, `btf_trace_NAME` for tp_btf).
    pub fn id(&self, kind: &str, name: &str) -> Option<u32> {
        self.by_name
            .get(&(kind.to_owned(), name.to_owned()))
            .copied()
    }

    /// The parameters of kernel function `name`.
    pub fn function_params(&self, name: &str) -> Option<Vec<Param>> {
        let func = self.by_name.get(&("FUNC".into(), name.into()))?;
        self.proto_params(self.types.get(func)?.type_id?)
    }

    /// The arguments a raw (BTF) tracepoint program of tracepoint `name` gets: the
    /// `btf_trace_NAME` typedef's parameters without its leading `void *`.
    pub fn tracepoint_params(&self, name: &str) -> Option<Vec<Param>> {
        let typedef = self
            .by_name
            .get(&("TYPEDEF".into(), format!("btf_trace_{name}")))?;
        let ptr = self.types.get(&self.types.get(typedef)?.type_id?)?;
        let mut params = self.proto_params(ptr.type_id?)?;
        if params.is_empty() {
            return None;
        }
        params.remove(0);
        Some(params)
    }

    fn proto_params(&self, proto: u32) -> Option<Vec<Param>> {
        let proto = self.types.get(&proto)?;
        (proto.kind == "FUNC_PROTO").then(|| {
            proto
                .params
                .iter()
                .map(|(name, id)| Param {
                    name: name.clone(),
                    ty: self.type_name(*id, 0),
                })
                .collect()
        })
    }

    /// A type as C spells it, e.g. `const struct sock *`.
    fn type_name(&self, id: u32, depth: u8) -> String {
        let Some(t) = self.types.get(&id).filter(|_| depth < 16) else {
            return if id == 0 { "void" } else { "?" }.to_owned();
        };
        let inner = || self.type_name(t.type_id.unwrap_or(0), depth + 1);
        match t.kind.as_str() {
            "PTR" => format!("{} *", inner()),
            "CONST" => format!("const {}", inner()),
            "VOLATILE" => format!("volatile {}", inner()),
            "RESTRICT" | "TYPE_TAG" => inner(),
            "STRUCT" => format!("struct {}", t.name),
            "UNION" => format!("union {}", t.name),
            "ENUM" | "ENUM64" => format!("enum {}", t.name),
            _ => t.name.clone(),
        }
    }
}

/// The text between the first pair of single quotes.
fn quoted(s: &str) -> Option<&str> {
    let start = s.find('\'')? + 1;
    let len = s[start..].find('\'')?;
    Some(&s[start..start + len])
}

/// The number after `key` (e.g. `type_id=`).
fn number(s: &str, key: &str) -> Option<u32> {
    let start = s.find(key)? + key.len();
    let digits: String = s[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as bpftool 7 prints them for a 6.18 kernel, ids made small.
    const DUMP: &str = "[1] INT 'int' size=4 bits_offset=0 nr_bits=32 encoding=SIGNED
[2] STRUCT 'sock' size=784 vlen=1
\t'__sk_common' type_id=9 bits_offset=0
[3] PTR '(anon)' type_id=2
[4] CONST '(anon)' type_id=2
[5] PTR '(anon)' type_id=4
[6] STRUCT 'socket' size=128 vlen=0
[7] PTR '(anon)' type_id=6
[8] PTR '(anon)' type_id=0
[10] FUNC_PROTO '(anon)' ret_type_id=1 vlen=2
\t'sock' type_id=7
\t'flags' type_id=1
[11] FUNC 'inet_stream_connect' type_id=10 linkage=static
[12] TYPEDEF 'btf_trace_inet_sock_set_state' type_id=13
[13] PTR '(anon)' type_id=14
[14] FUNC_PROTO '(anon)' ret_type_id=0 vlen=3
\t'(anon)' type_id=8
\t'(anon)' type_id=5
\t'(anon)' type_id=1
";

    #[test]
    fn function_and_tracepoint_parameters() {
        let btf = Btf::parse(DUMP);
        let p = |name: &str, ty: &str| Param {
            name: name.into(),
            ty: ty.into(),
        };
        assert_eq!(
            btf.function_params("inet_stream_connect"),
            Some(vec![p("sock", "struct socket *"), p("flags", "int")])
        );
        assert_eq!(
            btf.tracepoint_params("inet_sock_set_state"),
            Some(vec![p("", "const struct sock *"), p("", "int")])
        );
        assert_eq!(btf.function_params("no_such_function"), None);
        assert_eq!(btf.tracepoint_params("no_such_tracepoint"), None);
        assert_eq!(btf.id("FUNC", "inet_stream_connect"), Some(11));
        assert_eq!(btf.id("TYPEDEF", "btf_trace_inet_sock_set_state"), Some(12));
        assert_eq!(btf.id("FUNC", "btf_trace_inet_sock_set_state"), None);
    }
}

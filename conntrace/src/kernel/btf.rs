//! Kernel structure offsets and enum names, read from the running kernel's BTF.
//!
//! The eBPF programs read a few kernel structures (a socket's network namespace, the socket
//! behind a file descriptor). Their layout changes between kernels and builds, so the offsets
//! are looked up here at start-up instead of being compiled in.

use std::{collections::BTreeMap, path::Path};

use btf_rs::{Btf, Type};
use conntrace_common::{FlowOffsets, KernelOffsets};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "kernel BTF not found at {path}: conntrace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    Missing { path: String },
    #[error("failed to parse kernel BTF at {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: btf_rs::Error,
    },
}

/// The route-lookup programs' offsets (`Config::flow4`, `flow6`, `fib6_type`,
/// `fib6_table_id`).
pub struct Flows {
    pub flow4: FlowOffsets,
    pub flow6: FlowOffsets,
    pub fib6_type: u32,
    pub fib6_table_id: u32,
}

/// The kernel's BTF, with the look-ups conntrace needs.
pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    pub fn load(path: &Path) -> Result<Self, BtfError> {
        let shown = path.display().to_string();
        if !path.exists() {
            return Err(BtfError::Missing { path: shown });
        }
        let btf = Btf::from_file(path).map_err(|source| BtfError::Parse {
            path: shown,
            source,
        })?;
        Ok(Self { btf })
    }

    fn composite(&self, name: &str) -> Option<btf_rs::Struct> {
        self.btf
            .resolve_types_by_name(name)
            .ok()?
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) | Type::Union(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
    }

    /// Follows typedefs and qualifiers to a struct or union.
    fn strip_to_composite(&self, mut ty: Type) -> Option<btf_rs::Struct> {
        for _ in 0..16 {
            match ty {
                Type::Struct(s) | Type::Union(s) => return Some(s),
                Type::Typedef(_)
                | Type::Const(_)
                | Type::Volatile(_)
                | Type::Restrict(_)
                | Type::TypeTag(_) => {
                    ty = self.btf.resolve_chained_type(ty.as_btf_type()?).ok()?;
                }
                _ => return None,
            }
        }
        None
    }

    /// Finds `name` among `s`'s members, descending into anonymous structs and unions.
    /// Returns the member's bit offset and its type.
    fn find_member(&self, s: &btf_rs::Struct, name: &str, depth: u32) -> Option<(u32, Type)> {
        if depth > 8 {
            return None;
        }
        for m in &s.members {
            let member_name = self.btf.resolve_name(m).unwrap_or_default();
            let ty = self.btf.resolve_chained_type(m).ok()?;
            if member_name == name {
                return Some((m.bit_offset(), ty));
            }
            if member_name.is_empty()
                && let Some(inner) = self.strip_to_composite(ty)
                && let Some((off, t)) = self.find_member(&inner, name, depth + 1)
            {
                return Some((m.bit_offset() + off, t));
            }
        }
        None
    }

    /// Byte offset of `path` (e.g. `["__sk_common", "skc_net", "net"]`) inside `struct name`.
    pub fn offset_of(&self, name: &str, path: &[&str]) -> Option<u32> {
        let mut current = self.composite(name)?;
        let mut bits = 0;
        for (i, part) in path.iter().enumerate() {
            let (off, ty) = self.find_member(&current, part, 0)?;
            bits += off;
            if i + 1 < path.len() {
                current = self.strip_to_composite(ty)?;
            }
        }
        (bits % 8 == 0).then_some(bits / 8)
    }

    /// The offsets the eBPF programs need; a member that cannot be found is `MISSING`, which
    /// turns off only the fact that depends on it.
    pub fn kernel_offsets(&self) -> KernelOffsets {
        let off = |s: &str, p: &[&str]| self.offset_of(s, p).unwrap_or(KernelOffsets::MISSING);
        KernelOffsets {
            sock_net: off("sock", &["__sk_common", "skc_net", "net"]),
            net_inum: off("net", &["ns", "inum"]),
            sock_num: off("sock", &["__sk_common", "skc_num"]),
            sock_dport: off("sock", &["__sk_common", "skc_dport"]),
            skb_dev: off("sk_buff", &["dev"]),
            netdev_net: off("net_device", &["nd_net", "net"]),
            task_files: off("task_struct", &["files"]),
            files_fdt: off("files_struct", &["fdt"]),
            fdtable_max_fds: off("fdtable", &["max_fds"]),
            fdtable_fd: off("fdtable", &["fd"]),
            file_private_data: off("file", &["private_data"]),
            socket_type: off("socket", &["type"]),
            socket_sk: off("socket", &["sk"]),
            skb_head: off("sk_buff", &["head"]),
            skb_transport_header: off("sk_buff", &["transport_header"]),
            skb_network_header: off("sk_buff", &["network_header"]),
            skb_sk: off("sk_buff", &["sk"]),
            sock_err: off("sock", &["sk_err"]),
            sock_err_soft: off("sock", &["sk_err_soft"]),
            skb_protocol: off("sk_buff", &["protocol"]),
            tcp_bytes_received: off("tcp_sock", &["bytes_received"]),
            skb_refdst: off("sk_buff", &["_skb_refdst"]),
            dst_dev: off("dst_entry", &["dev"]),
            skb_len: off("sk_buff", &["len"]),
            skb_iif: off("sk_buff", &["skb_iif"]),
            tcp_mss_cache: off("tcp_sock", &["mss_cache"]),
            tcp_sacked_out: off("tcp_sock", &["sacked_out"]),
            sock_socket: off("sock", &["sk_socket"]),
            sock_protocol: off("sock", &["sk_protocol"]),
            sock_v6_daddr: off("sock", &["__sk_common", "skc_v6_daddr"]),
            sock_v6_rcv_saddr: off("sock", &["__sk_common", "skc_v6_rcv_saddr"]),
            inet_sport: off("inet_sock", &["inet_sport"]),
            task_nsproxy: off("task_struct", &["nsproxy"]),
            nsproxy_net_ns: off("nsproxy", &["net_ns"]),
            sock_state: off("sock", &["__sk_common", "skc_state"]),
            sock_ack_backlog: off("sock", &["sk_ack_backlog"]),
            sock_max_ack_backlog: off("sock", &["sk_max_ack_backlog"]),
            socket_file: off("socket", &["file"]),
            file_inode: off("file", &["f_inode"]),
            inode_ino: off("inode", &["i_ino"]),
            icsk_accept_head: off(
                "inet_connection_sock",
                &["icsk_accept_queue", "rskq_accept_head"],
            ),
            reqsk_next: off("request_sock", &["dl_next"]),
            reqsk_sk: off("request_sock", &["sk"]),
            task_comm: off("task_struct", &["comm"]),
            sock_dst_cache: off("sock", &["sk_dst_cache"]),
            sock_route_caps: off("sock", &["sk_route_caps"]),
        }
    }

    /// Where the route lookups' flows keep what the BTF-typed route-lookup programs read;
    /// members BTF lacks are `MISSING`.
    pub fn flow_offsets(&self) -> Flows {
        let off = |s: &str, p: &[&str]| self.offset_of(s, p).unwrap_or(KernelOffsets::MISSING);
        let flow = |s: &str| FlowOffsets {
            iif: off(s, &["__fl_common", "flowic_iif"]),
            proto: off(s, &["__fl_common", "flowic_proto"]),
            saddr: off(s, &["saddr"]),
            daddr: off(s, &["daddr"]),
            ports: off(s, &["uli", "ports"]),
        };
        Flows {
            flow4: flow("flowi4"),
            flow6: flow("flowi6"),
            fib6_type: off("fib6_result", &["fib6_type"]),
            fib6_table_id: off("fib6_table", &["tb6_id"]),
        }
    }

    /// Whether `struct sock_common` is laid out where the BTF-typed lifecycle program loads it
    /// directly (`conntrace_common::sock_common`).
    pub fn sock_common_as_compiled(&self) -> bool {
        use conntrace_common::sock_common as c;
        let at = |path: &[&str], expected: usize| {
            self.offset_of("sock", path) == u32::try_from(expected).ok()
        };
        at(&["__sk_common", "skc_daddr"], c::DADDR)
            && at(&["__sk_common", "skc_rcv_saddr"], c::RCV_SADDR)
            && at(&["__sk_common", "skc_dport"], c::PORTPAIR)
            && at(&["__sk_common", "skc_num"], c::PORTPAIR + 2)
            && at(&["__sk_common", "skc_family"], c::FAMILY)
            && at(&["__sk_common", "skc_net", "net"], c::NET)
    }

    /// How many arguments BTF-typed tracepoint `name` passes its programs (the parameters of
    /// its `btf_trace_<name>` prototype, less the leading `void *`); `None` when BTF does not
    /// describe it.
    pub fn tracepoint_args(&self, name: &str) -> Option<usize> {
        let typedef = self
            .btf
            .resolve_types_by_name(&format!("btf_trace_{name}"))
            .ok()?
            .into_iter()
            .find(|t| matches!(t, Type::Typedef(_)))?;
        let mut ty = typedef;
        for _ in 0..8 {
            ty = match ty {
                Type::FuncProto(proto) => return proto.parameters.len().checked_sub(1),
                Type::Typedef(_) | Type::Ptr(_) | Type::Const(_) => {
                    self.btf.resolve_chained_type(ty.as_btf_type()?).ok()?
                }
                _ => return None,
            };
        }
        None
    }

    /// Value → name of the enumerators of `enum name` (e.g. `sk_rst_reason`), with `prefix`
    /// stripped from the names. Empty when this kernel has no such enum.
    pub fn enum_names(&self, name: &str, prefix: &str) -> BTreeMap<u32, String> {
        let mut out = BTreeMap::new();
        let Ok(types) = self.btf.resolve_types_by_name(name) else {
            return out;
        };
        for t in types {
            if let Type::Enum(e) = t {
                for m in &e.members {
                    if let Ok(n) = self.btf.resolve_name(m) {
                        out.insert(m.val(), n.strip_prefix(prefix).unwrap_or(&n).to_owned());
                    }
                }
            }
        }
        out
    }
}

/// Names of the offsets that could not be resolved, for the `ready` line and logs.
pub fn missing_offsets(o: &KernelOffsets) -> Vec<&'static str> {
    let all = [
        ("sock.__sk_common.skc_net", o.sock_net),
        ("net.ns.inum", o.net_inum),
        ("sock.__sk_common.skc_num", o.sock_num),
        ("sock.__sk_common.skc_dport", o.sock_dport),
        ("sk_buff.dev", o.skb_dev),
        ("net_device.nd_net", o.netdev_net),
        ("task_struct.files", o.task_files),
        ("files_struct.fdt", o.files_fdt),
        ("fdtable.max_fds", o.fdtable_max_fds),
        ("fdtable.fd", o.fdtable_fd),
        ("file.private_data", o.file_private_data),
        ("socket.type", o.socket_type),
        ("socket.sk", o.socket_sk),
        ("sk_buff.head", o.skb_head),
        ("sk_buff.transport_header", o.skb_transport_header),
        ("sk_buff.network_header", o.skb_network_header),
        ("sk_buff.sk", o.skb_sk),
        ("sock.sk_err", o.sock_err),
        ("sock.sk_err_soft", o.sock_err_soft),
        ("sk_buff.protocol", o.skb_protocol),
        ("tcp_sock.bytes_received", o.tcp_bytes_received),
        ("sk_buff._skb_refdst", o.skb_refdst),
        ("dst_entry.dev", o.dst_dev),
        ("sk_buff.len", o.skb_len),
        ("sk_buff.skb_iif", o.skb_iif),
        ("tcp_sock.mss_cache", o.tcp_mss_cache),
        ("tcp_sock.sacked_out", o.tcp_sacked_out),
        ("sock.sk_socket", o.sock_socket),
        ("sock.sk_protocol", o.sock_protocol),
        ("sock.__sk_common.skc_v6_daddr", o.sock_v6_daddr),
        ("sock.__sk_common.skc_v6_rcv_saddr", o.sock_v6_rcv_saddr),
        ("inet_sock.inet_sport", o.inet_sport),
        ("task_struct.nsproxy", o.task_nsproxy),
        ("nsproxy.net_ns", o.nsproxy_net_ns),
        ("sock.__sk_common.skc_state", o.sock_state),
        ("sock.sk_ack_backlog", o.sock_ack_backlog),
        ("sock.sk_max_ack_backlog", o.sock_max_ack_backlog),
        ("socket.file", o.socket_file),
        ("file.f_inode", o.file_inode),
        ("inode.i_ino", o.inode_ino),
        (
            "inet_connection_sock.icsk_accept_queue.rskq_accept_head",
            o.icsk_accept_head,
        ),
        ("request_sock.dl_next", o.reqsk_next),
        ("request_sock.sk", o.reqsk_sk),
        ("task_struct.comm", o.task_comm),
        ("sock.sk_dst_cache", o.sock_dst_cache),
        ("sock.sk_route_caps", o.sock_route_caps),
    ];
    all.into_iter()
        .filter(|(_, v)| *v == KernelOffsets::MISSING)
        .map(|(n, _)| n)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs against the build machine's own BTF when it has one: these members exist on every
    /// kernel conntrace supports.
    #[test]
    fn resolves_running_kernel_offsets() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("skipped: {VMLINUX_BTF} absent (kernel without BTF)");
            return;
        }
        let btf = KernelBtf::load(path).expect("parse vmlinux BTF");
        let o = btf.kernel_offsets();
        assert!(
            missing_offsets(&o).is_empty(),
            "missing: {:?}",
            missing_offsets(&o)
        );
        // `skc_net` lives inside `struct sock_common`, the first member of `struct sock`.
        assert!(o.sock_net < 256, "sock_net={}", o.sock_net);
        // skc_dport and skc_num share one 32-bit word: dport first, then num.
        assert_eq!(o.sock_num, o.sock_dport + 2);
        // The accept queue sits in `inet_connection_sock`, which starts with `struct sock`:
        // past the end of the generic socket fields.
        assert!(o.icsk_accept_head > o.sock_ack_backlog, "{o:?}");
        assert!(o.reqsk_sk > o.reqsk_next, "{o:?}");
        assert!(btf.offset_of("sock", &["no_such_member"]).is_none());
        let reasons = btf.enum_names("tcp_state_unused_name", "");
        assert!(reasons.is_empty());
    }
}

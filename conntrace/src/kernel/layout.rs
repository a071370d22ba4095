//! Tracepoint record layouts, read from tracefs `format` files.
//!
//! The fields of `tcp:*` and `sock:*` tracepoints move between kernel versions (6.10 turned
//! `tcp_send_reset`'s addresses into `sockaddr`s and added a reason), so conntrace never assumes
//! offsets: it parses the running kernel's description of each record.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use conntrace_common::{ABSENT, FibLayout, SyscallLayout, TracepointLayout};

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "tracefs is not mounted (looked in /sys/kernel/tracing and /sys/kernel/debug/tracing) and could not be mounted; mount it with `mount -t tracefs nodev /sys/kernel/tracing`"
    )]
    NoTracefs,
    #[error("tracepoint {category}:{name} does not exist on this kernel ({path})")]
    NoTracepoint {
        category: String,
        name: String,
        path: PathBuf,
    },
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tracepoint {tracepoint}: field `{field}` is missing from its format")]
    MissingField {
        tracepoint: String,
        field: &'static str,
    },
}

/// One field of a tracepoint record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub offset: u16,
    pub size: u16,
}

/// Parses the `field:` lines of a tracepoint `format` file into name → (offset, size).
pub fn parse_format(text: &str) -> HashMap<String, Field> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let mut decl = None;
        let (mut offset, mut size) = (None, None);
        for part in line.trim().split(';') {
            let part = part.trim();
            if let Some(d) = part.strip_prefix("field:") {
                decl = Some(d.trim());
            } else if let Some(v) = part.strip_prefix("offset:") {
                offset = v.trim().parse::<u16>().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.trim().parse::<u16>().ok();
            }
        }
        let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
            continue;
        };
        // "const void * skaddr", "__u8 saddr[4]", "enum sk_rst_reason reason"
        let last = decl.rsplit([' ', '*']).next().unwrap_or(decl);
        let name = last.split('[').next().unwrap_or(last);
        fields.insert(name.to_owned(), Field { offset, size });
    }
    fields
}

fn offset(fields: &HashMap<String, Field>, name: &str) -> u16 {
    fields.get(name).map_or(ABSENT, |f| f.offset)
}

/// Builds the layout conntrace's programs use from a parsed format.
pub fn tracepoint_layout(fields: &HashMap<String, Field>) -> TracepointLayout {
    let mut l = TracepointLayout::NONE;
    l.skaddr = offset(fields, "skaddr");
    l.skbaddr = offset(fields, "skbaddr");
    l.protocol = offset(fields, "protocol");
    l.oldstate = offset(fields, "oldstate");
    l.newstate = offset(fields, "newstate");
    l.state = offset(fields, "state");
    l.error = offset(fields, "error");
    l.reason = offset(fields, "reason");
    l.location = offset(fields, "location");
    l.rx_sk = offset(fields, "rx_sk");
    l.sk = offset(fields, "sk");
    l.ret = offset(fields, "ret");
    let t = &mut l.tuple;
    t.family = offset(fields, "family");
    t.sport = offset(fields, "sport");
    t.dport = offset(fields, "dport");
    t.saddr6 = offset(fields, "saddr_v6");
    t.daddr6 = offset(fields, "daddr_v6");
    match (fields.get("saddr"), fields.get("daddr")) {
        // `__u8 saddr[sizeof(struct sockaddr_in6)]` (28 bytes): family, port and address inside.
        (Some(s), Some(d)) if s.size >= 28 && d.size >= 28 => {
            t.sockaddr_src = s.offset;
            t.sockaddr_dst = d.offset;
        }
        (s, d) => {
            t.saddr4 = s.map_or(ABSENT, |f| f.offset);
            t.daddr4 = d.map_or(ABSENT, |f| f.offset);
        }
    }
    l
}

/// The layout of a route lookup tracepoint (`fib:fib_table_lookup`, `fib6:fib6_table_lookup`).
pub fn fib_layout(fields: &HashMap<String, Field>) -> FibLayout {
    FibLayout {
        tb_id: offset(fields, "tb_id"),
        err: offset(fields, "err"),
        iif: offset(fields, "iif"),
        proto: offset(fields, "proto"),
        src: offset(fields, "src"),
        dst: offset(fields, "dst"),
        sport: offset(fields, "sport"),
        dport: offset(fields, "dport"),
    }
}

/// [`fib_layout`] of `category:name`, all [`ABSENT`] when this kernel lacks the tracepoint.
pub fn optional_fib_layout(
    root: &Path,
    category: &str,
    name: &str,
) -> Result<FibLayout, LayoutError> {
    match read_format(root, category, name) {
        Ok(fields) => Ok(fib_layout(&fields)),
        Err(LayoutError::NoTracepoint { .. }) => Ok(FibLayout::NONE),
        Err(e) => Err(e),
    }
}

/// The tracefs directory of this machine.
pub fn tracefs_root() -> Result<PathBuf, LayoutError> {
    let find = || {
        ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.join("events").is_dir())
    };
    find()
        .or_else(|| mount_in_own_namespace().then(find).flatten())
        .ok_or(LayoutError::NoTracefs)
}

/// Mounts tracefs at /sys/kernel/tracing when conntrace runs in a mount namespace other than
/// init's, or than its parent's where init's cannot be read (`ip netns exec` gives its command
/// one, with a fresh /sys that has no tracefs): the mount stays in that namespace, which ends
/// with it. Never in the host's own mount namespace. Whether it mounted.
fn mount_in_own_namespace() -> bool {
    use std::os::unix::fs::MetadataExt;
    let ns = |p: &str| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    // init's namespace where it can be read, else the parent's (`ip netns exec` runs its
    // command in the namespace it unshared, under the caller's shell).
    let parent = format!("/proc/{}/ns/mnt", std::os::unix::process::parent_id());
    let own = ns("/proc/self/ns/mnt");
    let other = ns("/proc/1/ns/mnt").or_else(|| ns(&parent));
    if own.is_none() || other.is_none() || own == other {
        return false;
    }
    // SAFETY: mount(2) with constant NUL-terminated strings and no data.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            c"/sys/kernel/tracing".as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        tracing::info!(
            "tracefs was not mounted in this mount namespace (a fresh /sys, as under `ip netns exec`): mounted it at /sys/kernel/tracing there"
        );
    }
    rc == 0
}

/// Reads and parses the format of `category:name`.
pub fn read_format(
    root: &Path,
    category: &str,
    name: &str,
) -> Result<HashMap<String, Field>, LayoutError> {
    let dir = root.join("events").join(category).join(name);
    if !dir.is_dir() {
        return Err(LayoutError::NoTracepoint {
            category: category.into(),
            name: name.into(),
            path: dir,
        });
    }
    let path = dir.join("format");
    let text =
        std::fs::read_to_string(&path).map_err(|source| LayoutError::Read { path, source })?;
    Ok(parse_format(&text))
}

/// Offsets of the syscall tracepoints' arguments; all absent on a kernel without syscall
/// tracepoints (`CONFIG_FTRACE_SYSCALLS` unset), where only fentry/fexit can serve.
pub fn syscall_layout(root: &Path) -> Result<SyscallLayout, LayoutError> {
    let enter = match read_format(root, "syscalls", "sys_enter_connect") {
        Ok(fields) => fields,
        Err(LayoutError::NoTracepoint { .. }) => return Ok(SyscallLayout::NONE),
        Err(e) => return Err(e),
    };
    let exit = read_format(root, "syscalls", "sys_exit_connect")?;
    let need = |fields: &HashMap<String, Field>, field: &'static str, tp: &str| {
        fields
            .get(field)
            .map(|f| f.offset)
            .ok_or_else(|| LayoutError::MissingField {
                tracepoint: tp.into(),
                field,
            })
    };
    Ok(SyscallLayout {
        connect_fd: need(&enter, "fd", "syscalls:sys_enter_connect")?,
        connect_addr: need(&enter, "uservaddr", "syscalls:sys_enter_connect")?,
        exit_ret: need(&exit, "ret", "syscalls:sys_exit_connect")?,
        _pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tcp:tcp_send_reset` as Linux 6.18 describes it (sockaddr form, with a reason).
    const SEND_RESET_6_18: &str = "name: tcp_send_reset
ID: 1541
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:enum sk_rst_reason reason;\toffset:28;\tsize:4;\tsigned:0;
\tfield:__u8 saddr[28];\toffset:32;\tsize:28;\tsigned:0;
\tfield:__u8 daddr[28];\toffset:60;\tsize:28;\tsigned:0;

print fmt: \"skbaddr=%p\"
";

    /// `tcp:tcp_send_reset` as Linux 6.1 describes it (separate ports and addresses).
    const SEND_RESET_6_1: &str = "format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:32;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:34;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:38;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:42;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:58;\tsize:16;\tsigned:0;
";

    /// `fib6:fib6_table_lookup` as Linux 6.18 describes it (its addresses are unaligned).
    const FIB6_TABLE_LOOKUP_6_18: &str = "name: fib6_table_lookup
ID: 2315
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:u32 tb_id;\toffset:8;\tsize:4;\tsigned:0;
\tfield:int err;\toffset:12;\tsize:4;\tsigned:1;
\tfield:int oif;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int iif;\toffset:20;\tsize:4;\tsigned:1;
\tfield:u32 flowlabel;\toffset:24;\tsize:4;\tsigned:0;
\tfield:__u8 tos;\toffset:28;\tsize:1;\tsigned:0;
\tfield:__u8 scope;\toffset:29;\tsize:1;\tsigned:0;
\tfield:__u8 flags;\toffset:30;\tsize:1;\tsigned:0;
\tfield:__u8 src[16];\toffset:31;\tsize:16;\tsigned:0;
\tfield:__u8 dst[16];\toffset:47;\tsize:16;\tsigned:0;
\tfield:u16 sport;\toffset:64;\tsize:2;\tsigned:0;
\tfield:u16 dport;\toffset:66;\tsize:2;\tsigned:0;
\tfield:u8 proto;\toffset:68;\tsize:1;\tsigned:0;
\tfield:u8 rt_type;\toffset:69;\tsize:1;\tsigned:0;
\tfield:char name[16];\toffset:70;\tsize:16;\tsigned:0;
\tfield:__u8 gw[16];\toffset:86;\tsize:16;\tsigned:0;
";

    #[test]
    fn route_lookup_layout_from_its_format() {
        let l = fib_layout(&parse_format(FIB6_TABLE_LOOKUP_6_18));
        assert_eq!((l.tb_id, l.err, l.iif, l.proto), (8, 12, 20, 68));
        assert_eq!((l.src, l.dst, l.sport, l.dport), (31, 47, 64, 66));
        // A kernel whose record lacks a field: the program reports nothing.
        let l = fib_layout(&parse_format(SEND_RESET_6_1));
        assert_eq!((l.err, l.proto, l.iif), (ABSENT, ABSENT, ABSENT));
    }

    #[test]
    fn parses_field_names_offsets_and_sizes() {
        let f = parse_format(SEND_RESET_6_18);
        assert_eq!(
            f["skaddr"],
            Field {
                offset: 16,
                size: 8
            }
        );
        assert_eq!(
            f["reason"],
            Field {
                offset: 28,
                size: 4
            }
        );
        assert_eq!(
            f["saddr"],
            Field {
                offset: 32,
                size: 28
            }
        );
        assert!(!f.contains_key("print fmt"));
    }

    #[test]
    fn sockaddr_form_on_new_kernels() {
        let l = tracepoint_layout(&parse_format(SEND_RESET_6_18));
        assert_eq!((l.tuple.sockaddr_src, l.tuple.sockaddr_dst), (32, 60));
        assert_eq!(
            (l.tuple.saddr4, l.tuple.sport, l.tuple.family),
            (ABSENT, ABSENT, ABSENT)
        );
        assert_eq!((l.skaddr, l.skbaddr, l.state, l.reason), (16, 8, 24, 28));
    }

    #[test]
    fn separate_fields_on_old_kernels() {
        let l = tracepoint_layout(&parse_format(SEND_RESET_6_1));
        assert_eq!(l.tuple.sockaddr_src, ABSENT);
        assert_eq!((l.tuple.sport, l.tuple.dport, l.tuple.family), (28, 30, 32));
        assert_eq!(
            (
                l.tuple.saddr4,
                l.tuple.daddr4,
                l.tuple.saddr6,
                l.tuple.daddr6
            ),
            (34, 38, 42, 58)
        );
        assert_eq!(l.reason, ABSENT);
    }
}

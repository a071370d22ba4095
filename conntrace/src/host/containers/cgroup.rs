//! Which container a process is in, from its cgroup path (`/proc/PID/cgroup`): the runtime and
//! the container id, by the layouts the runtimes use with the cgroupfs and systemd drivers.
//!
//! | runtime | cgroupfs | systemd |
//! |---|---|---|
//! | Podman | `/libpod_parent/libpod-ID` | `/machine.slice/libpod-ID.scope` |
//! | Docker | `/docker/ID` | `/system.slice/docker-ID.scope` |
//! | containerd (Kubernetes) | `/kubepods/QOS/podUID/ID` | `.../cri-containerd-ID.scope` |
//! | CRI-O (Kubernetes) | `/kubepods/QOS/podUID/crio-ID` | `.../crio-ID.scope` |
//! | containerd (`ctr`, nerdctl) | `/NAMESPACE/ID` | `nerdctl-ID.scope` |
//!
//! `ID` is 64 hex digits except for `ctr`, whose ids are the names given to `ctr run`; such a
//! two-part path is only a candidate, confirmed when NAMESPACE is one of containerd's.

use crate::identity::Runtime;

/// Where a process's cgroup says it runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CgroupRef {
    /// A runtime's own layout: the runtime and the container id.
    Known { runtime: Runtime, id: String },
    /// A Kubernetes pod's container whose runtime the path does not say (cgroupfs driver):
    /// containerd's `k8s.io` namespace, or Docker through cri-dockerd.
    Kubepods { id: String },
    /// `/NAMESPACE/ID`: a plain containerd task, if NAMESPACE is a containerd namespace.
    ContainerdCandidate { namespace: String, id: String },
}

impl CgroupRef {
    /// The container id.
    pub fn id(&self) -> &str {
        match self {
            Self::Known { id, .. }
            | Self::Kubepods { id }
            | Self::ContainerdCandidate { id, .. } => id,
        }
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The container of one cgroup path (`/a/b/c`), or `None` for a host cgroup.
pub fn parse_path(path: &str) -> Option<CgroupRef> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    // The innermost component that names a container; runtimes nest (a Podman container
    // inside a Kubernetes pod) and the innermost is the process's own.
    for part in parts.iter().rev() {
        let stem = part.strip_suffix(".scope").unwrap_or(part);
        for (prefix, runtime) in [
            ("libpod-conmon-", None),
            ("libpod-", Some(Runtime::Podman)),
            ("docker-", Some(Runtime::Docker)),
            ("cri-containerd-", Some(Runtime::Containerd)),
            ("nerdctl-", Some(Runtime::Containerd)),
            ("crio-conmon-", None),
            ("crio-", Some(Runtime::CriO)),
        ] {
            if let Some(id) = stem.strip_prefix(prefix) {
                // A runtime's monitor process (conmon) is not in the container.
                let runtime = runtime?;
                return is_hex64(id).then(|| CgroupRef::Known {
                    runtime,
                    id: id.to_owned(),
                });
            }
        }
    }
    match parts.as_slice() {
        ["docker", id, ..] if is_hex64(id) => Some(CgroupRef::Known {
            runtime: Runtime::Docker,
            id: (*id).to_owned(),
        }),
        [first, .., id] if first.starts_with("kubepods") && is_hex64(id) => {
            Some(CgroupRef::Kubepods {
                id: (*id).to_owned(),
            })
        }
        [namespace, id]
            if !namespace.ends_with(".slice")
                && !id.ends_with(".service")
                && !id.ends_with(".scope")
                && !namespace.starts_with("kubepods")
                && !["libpod_parent", "docker", "lxc"].contains(namespace) =>
        {
            Some(CgroupRef::ContainerdCandidate {
                namespace: (*namespace).to_owned(),
                id: (*id).to_owned(),
            })
        }
        _ => None,
    }
}

/// The container of a `/proc/PID/cgroup` text: the unified (v2) line when it names a cgroup,
/// else the first v1 line that names a container (hybrid hosts keep containers in both).
pub fn parse(text: &str) -> Option<CgroupRef> {
    let mut lines: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (id, controllers, path) = (f.next()?, f.next()?, f.next()?);
            Some((
                if id == "0" && controllers.is_empty() {
                    "0"
                } else {
                    controllers
                },
                path,
            ))
        })
        .collect();
    // The unified line first, then systemd's, then the rest.
    lines.sort_by_key(|(c, _)| match *c {
        "0" => 0,
        "name=systemd" => 1,
        _ => 2,
    });
    lines.into_iter().find_map(|(_, path)| parse_path(path))
}

/// The container of process `pid`; `None` for a host process or one that is gone.
pub fn of_pid(pid: u32) -> Option<CgroupRef> {
    parse(&std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f0404f3800cb9ffbb56184f5c1f9afb05adca37d56b64d52078fb728fa03072";

    fn known(runtime: Runtime) -> Option<CgroupRef> {
        Some(CgroupRef::Known {
            runtime,
            id: ID.into(),
        })
    }

    #[test]
    fn runtimes_by_their_layouts() {
        let cases = [
            (
                format!("/libpod_parent/libpod-{ID}"),
                known(Runtime::Podman),
            ),
            (
                format!("/machine.slice/libpod-{ID}.scope"),
                known(Runtime::Podman),
            ),
            (
                format!(
                    "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
                ),
                known(Runtime::Podman),
            ),
            (format!("/docker/{ID}"), known(Runtime::Docker)),
            (
                format!("/system.slice/docker-{ID}.scope"),
                known(Runtime::Docker),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0a1b.slice/cri-containerd-{ID}.scope"
                ),
                known(Runtime::Containerd),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b.slice/crio-{ID}.scope"
                ),
                known(Runtime::CriO),
            ),
            (
                format!("/kubepods/besteffort/pod0a1b-22/{ID}"),
                Some(CgroupRef::Kubepods { id: ID.into() }),
            ),
            (
                "/k8s.io/ct-db-0".into(),
                Some(CgroupRef::ContainerdCandidate {
                    namespace: "k8s.io".into(),
                    id: "ct-db-0".into(),
                }),
            ),
        ];
        for (path, want) in cases {
            assert_eq!(parse_path(&path), want, "{path}");
        }
    }

    #[test]
    fn host_cgroups_and_monitors_are_no_container() {
        for path in [
            "/",
            "/init.scope",
            "/system.slice/ssh.service",
            "/user.slice/user-0.slice/session-3.scope",
            &format!("/machine.slice/libpod-conmon-{ID}.scope"),
            &format!("/system.slice/crio-conmon-{ID}.scope"),
            "/kubepods/besteffort",
            "/libpod_parent/conmon",
        ] {
            assert_eq!(parse_path(path), None, "{path}");
        }
    }

    #[test]
    fn the_unified_line_first_then_any_v1_line() {
        let hybrid = format!(
            "9:name=systemd:/libpod_parent/libpod-{ID}\n1:cpu:/libpod_parent/libpod-{ID}\n0::/libpod_parent/libpod-{ID}\n"
        );
        assert_eq!(parse(&hybrid), known(Runtime::Podman));
        // A v1-only container on a hybrid host whose unified line is the root.
        let v1 = format!("1:cpu:/docker/{ID}\n0::/\n");
        assert_eq!(parse(&v1), known(Runtime::Docker));
        assert_eq!(parse("0::/init.scope\n"), None);
        assert_eq!(parse(""), None);
    }
}

//! Container identity (`crate::identity::Container`) for records, and the network namespaces of
//! the containers `--container` and `--pod` select, found off the event loop by a worker thread
//! ([`worker`]): a process in the record's network namespace (or the record's own process) →
//! its cgroup ([`cgroup`]) → the container id → the runtime's API for name, image and labels
//! ([`docker`]: Docker and Podman's compatible service; [`containerd`]: containerd, including
//! Kubernetes' `k8s.io` namespace). CRI-O containers are recognised by their cgroup (runtime
//! and id) but not asked about: conntrace has no CRI-O client.
//!
//! The event loop only reads the worker's answers ([`Identities::lookup`], never blocking) and
//! asks for what it lacks; an absent or slow runtime costs only the fields the API would give
//! (every call is bounded by [`Options::api_timeout`]).

pub mod cgroup;
pub mod containerd;
pub mod docker;
mod handle;
mod worker;

use std::{collections::HashMap, path::PathBuf, time::Duration};

pub use self::handle::{Admit, Identities, Lookup};
use crate::identity::{Container, Image, K8s, Runtime, Via};

/// The CRI's labels on a pod's containers.
pub const K8S_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const K8S_POD: &str = "io.kubernetes.pod.name";
pub const K8S_CONTAINER: &str = "io.kubernetes.container.name";

/// Where the runtimes' APIs are, and what to select.
#[derive(Debug, Clone)]
pub struct Options {
    /// Docker Engine API sockets (Docker, Podman's service), tried in order.
    pub docker_sockets: Vec<PathBuf>,
    /// containerd sockets, tried in order.
    pub containerd_sockets: Vec<PathBuf>,
    /// Bound on each API call (connect, version, inspect).
    pub api_timeout: Duration,
    /// The sockets were given (`--docker-socket`, `--containerd-socket`): a failing one is a
    /// warning. The default ones fail quietly (debug level): a host may have none, or conntrace
    /// may run without the right to open them.
    pub warn_on_failure: bool,
    /// `--container` and `--pod`: when set, only their namespaces are admitted.
    pub select: Option<Selector>,
}

/// What `--container NAME` and `--pod NAMESPACE/NAME` select.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    /// Container names (as in `container.name`), or ids (12 or more leading hex digits).
    pub containers: Vec<String>,
    /// Kubernetes pods: (namespace, name).
    pub pods: Vec<(String, String)>,
}

impl Selector {
    /// Whether `c` is one of the selected containers or in one of the selected pods.
    pub fn matches(&self, c: &Container) -> bool {
        let by_name = self.containers.iter().any(|want| {
            c.name.as_deref() == Some(want.as_str()) || (want.len() >= 12 && c.id.starts_with(want))
        });
        let by_pod = c.k8s.as_ref().is_some_and(|k| {
            self.pods
                .iter()
                .any(|(ns, pod)| *ns == k.namespace && *pod == k.pod)
        });
        by_name || by_pod
    }
}

/// What a runtime's API says about a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    pub name: Option<String>,
    /// The image reference (or id) it was created from.
    pub image: Option<String>,
    pub labels: HashMap<String, String>,
    /// A Kubernetes pod's sandbox ("pause") container.
    pub sandbox: bool,
}

/// A runtime API call that failed; each names the socket and the call.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Docker Engine API at {}: {call}: {source}", socket.display())]
    Docker {
        socket: PathBuf,
        call: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("containerd API at {}: connect: {source}", socket.display())]
    ContainerdConnect {
        socket: PathBuf,
        #[source]
        source: containerd_client::tonic::transport::Error,
    },
    #[error("containerd API at {}: {call}: {source}", socket.display())]
    Containerd {
        socket: PathBuf,
        call: String,
        #[source]
        source: Box<containerd_client::tonic::Status>,
    },
    #[error("{api}: no answer within {after:?}")]
    Timeout { api: String, after: Duration },
    #[error("socket path {} is not UTF-8", .0.display())]
    Path(PathBuf),
}

/// The record's container from what the cgroup and the API said: `meta` is `None` when the
/// API could not be asked (then only the runtime and the id are known).
pub fn container(runtime: Runtime, id: &str, meta: Option<&Meta>, via: Via) -> Container {
    let label = |k: &str| meta.and_then(|m| m.labels.get(k)).cloned();
    let k8s = match (label(K8S_NAMESPACE), label(K8S_POD)) {
        (Some(namespace), Some(pod)) => Some(K8s {
            namespace,
            pod,
            container: label(K8S_CONTAINER),
        }),
        _ => None,
    };
    Container {
        runtime,
        id: id.to_owned(),
        name: meta.and_then(|m| m.name.clone()),
        image: meta
            .and_then(|m| m.image.clone())
            .map(|name| Image { name }),
        k8s,
        via,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labelled(pairs: &[(&str, &str)]) -> Meta {
        Meta {
            name: Some("mysql".into()),
            image: Some("localhost/debian:bookworm-min".into()),
            labels: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            sandbox: false,
        }
    }

    #[test]
    fn kubernetes_names_come_from_the_cri_labels() {
        let meta = labelled(&[
            (K8S_NAMESPACE, "shop"),
            (K8S_POD, "db-0"),
            (K8S_CONTAINER, "mysql"),
        ]);
        let c = container(Runtime::Containerd, "ct-db-0", Some(&meta), Via::Netns);
        assert_eq!(
            c.k8s,
            Some(K8s {
                namespace: "shop".into(),
                pod: "db-0".into(),
                container: Some("mysql".into())
            })
        );
        assert_eq!(
            c.image.map(|i| i.name).as_deref(),
            Some("localhost/debian:bookworm-min")
        );
        // Without the pod's labels there are no Kubernetes names; without an answer, no name.
        let plain = container(Runtime::Podman, "3f04", Some(&labelled(&[])), Via::Process);
        assert_eq!(plain.k8s, None);
        let unasked = container(Runtime::Podman, "3f04", None, Via::Process);
        assert_eq!((unasked.name, unasked.image), (None, None));
    }

    #[test]
    fn selectors_match_names_ids_and_pods() {
        let meta = labelled(&[(K8S_NAMESPACE, "shop"), (K8S_POD, "db-0")]);
        let id = "3f0404f3800cb9ffbb56184f5c1f9afb05adca37d56b64d52078fb728fa03072";
        let c = container(Runtime::Containerd, id, Some(&meta), Via::Netns);
        let by = |containers: &[&str], pods: &[(&str, &str)]| Selector {
            containers: containers.iter().map(|s| (*s).to_owned()).collect(),
            pods: pods
                .iter()
                .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                .collect(),
        };
        assert!(by(&["mysql"], &[]).matches(&c));
        assert!(by(&["3f0404f3800c"], &[]).matches(&c));
        assert!(!by(&["3f04"], &[]).matches(&c), "too short an id prefix");
        assert!(by(&[], &[("shop", "db-0")]).matches(&c));
        assert!(!by(&["web"], &[("shop", "db-1"), ("dev", "db-0")]).matches(&c));
    }
}

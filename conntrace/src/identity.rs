//! Who is behind a record on a container host: the `container` object of `verdict` and `drop`
//! records. Only the data lives here; `host::containers` finds it (cgroup → container id → the
//! runtime's API) off the event loop, and `run` puts it on records before they are written.
//! Names follow OpenTelemetry's resource conventions (`container.runtime`, `container.id`,
//! `container.name`, `container.image.name`, `k8s.namespace.name`, `k8s.pod.name`,
//! `k8s.container.name`), nested.

use schemars::JsonSchema;
use serde::Serialize;

/// The container runtime that runs a container, as its cgroup names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    /// Docker Engine (`docker-ID.scope`, `/docker/ID`).
    Docker,
    /// Podman (`libpod-ID.scope`, `/libpod_parent/libpod-ID`).
    Podman,
    /// containerd: Kubernetes' `cri-containerd-ID.scope`, or `ctr`/nerdctl's `/NAMESPACE/ID`.
    Containerd,
    /// CRI-O (`crio-ID.scope`).
    CriO,
}

impl Runtime {
    /// As serialized: `docker`, `podman`, `containerd`, `cri-o`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Podman => "podman",
            Self::Containerd => "containerd",
            Self::CriO => "cri-o",
        }
    }
}

/// The image a container was created from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct Image {
    /// The image reference as the container was created with it (e.g.
    /// `localhost/debian:bookworm-min`, `docker.io/library/mysql:8.4`); the image id when the
    /// runtime keeps no reference.
    pub name: String,
}

/// Kubernetes names, from the labels the CRI writes on a pod's containers
/// (`io.kubernetes.pod.namespace`, `io.kubernetes.pod.name`, `io.kubernetes.container.name`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct K8s {
    /// The pod's namespace (`k8s.namespace.name`).
    pub namespace: String,
    /// The pod's name (`k8s.pod.name`).
    pub pod: String,
    /// The container's name in the pod spec (`k8s.container.name`); null for the pod's sandbox
    /// ("pause") container, which owns the pod's network namespace.
    pub container: Option<String>,
}

/// How a record was tied to its container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// The record's process (`pid`) runs in this container.
    Process,
    /// The record's network namespace (`netns`) is this container's: a record without a
    /// process (a server-side drop or refusal). When several containers share the namespace (a
    /// pod), it is the pod's sandbox, or the one whose process has run longest.
    Netns,
}

/// The container behind a record (`container` in `verdict` and `drop` records).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct Container {
    pub runtime: Runtime,
    /// The runtime's container id (`container.id`): 64 hex digits for Docker, Podman and
    /// Kubernetes containers, the name given to `ctr run` for a plain containerd one.
    pub id: String,
    /// The runtime's name for it (`container.name`): Docker's or Podman's container name;
    /// for containerd, nerdctl's name label, else the Kubernetes container name, else the id.
    /// Null when the runtime's API could not be asked in time (no socket, too slow).
    pub name: Option<String>,
    /// Null when the runtime's API could not be asked in time.
    pub image: Option<Image>,
    /// Null when the runtime carries no Kubernetes labels for it.
    pub k8s: Option<K8s>,
    pub via: Via,
}

impl Container {
    /// A short human form: `podman:mysqld`, `k8s:shop/db-0/mysql`, `containerd:3f04…`.
    pub fn short(&self) -> String {
        if let Some(k) = &self.k8s {
            return match &k.container {
                Some(c) => format!("k8s:{}/{}/{c}", k.namespace, k.pod),
                None => format!("k8s:{}/{}", k.namespace, k.pod),
            };
        }
        let name = self.name.clone().unwrap_or_else(|| {
            let short: String = self.id.chars().take(12).collect();
            short
        });
        format!("{}:{name}", self.runtime.name())
    }
}

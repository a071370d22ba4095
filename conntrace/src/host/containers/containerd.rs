//! containerd's gRPC API on its unix socket (`containerd-client`): the container record of an
//! id (`containerd.services.containers.v1.Containers/Get`) in the namespace that holds it
//! (`k8s.io` for Kubernetes pods, `default` for `ctr`, `moby` for Docker's own), the namespaces
//! from `containerd.services.namespaces.v1.Namespaces/List`.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use containerd_client::{
    services::v1::{
        GetContainerRequest, ListNamespacesRequest, containers_client::ContainersClient,
        namespaces_client::NamespacesClient,
    },
    tonic::{Code, Request, transport::Channel},
    with_namespace,
};

use super::{ApiError, Meta, cgroup::CgroupRef};

/// Where Kubernetes' CRI plugin keeps pods.
const K8S_NAMESPACE: &str = "k8s.io";
/// The CRI plugin's label telling a pod's sandbox from its containers.
const CRI_KIND: (&str, &str) = ("io.cri-containerd.kind", "sandbox");
/// How long the namespace list is reused.
const NAMESPACES_FOR: Duration = Duration::from_secs(30);

/// A client of one containerd socket, connected on first use.
pub struct ContainerdApi {
    socket: PathBuf,
    channel: Option<Channel>,
    namespaces: Option<(Instant, Vec<String>)>,
    timeout: Duration,
}

impl ContainerdApi {
    /// Every call is bounded by `timeout`.
    pub fn new(socket: PathBuf, timeout: Duration) -> Self {
        Self {
            socket,
            channel: None,
            namespaces: None,
            timeout,
        }
    }

    fn timed_out(&self, call: &str) -> ApiError {
        ApiError::Timeout {
            api: format!("containerd API at {}: {call}", self.socket.display()),
            after: self.timeout,
        }
    }

    fn grpc(&self, call: String, source: containerd_client::tonic::Status) -> ApiError {
        ApiError::Containerd {
            socket: self.socket.clone(),
            call,
            source: Box::new(source),
        }
    }

    async fn channel(&mut self) -> Result<Channel, ApiError> {
        if let Some(c) = &self.channel {
            return Ok(c.clone());
        }
        let channel = tokio::time::timeout(self.timeout, containerd_client::connect(&self.socket))
            .await
            .map_err(|_| self.timed_out("connect"))?
            .map_err(|source| ApiError::ContainerdConnect {
                socket: self.socket.clone(),
                source,
            })?;
        self.channel = Some(channel.clone());
        Ok(channel)
    }

    /// containerd's namespaces, `k8s.io` first (cached for 30 s).
    async fn namespaces(&mut self) -> Result<Vec<String>, ApiError> {
        if let Some((at, list)) = &self.namespaces
            && at.elapsed() < NAMESPACES_FOR
        {
            return Ok(list.clone());
        }
        let call = "Namespaces/List";
        let mut client = NamespacesClient::new(self.channel().await?);
        let reply = tokio::time::timeout(
            self.timeout,
            client.list(ListNamespacesRequest {
                filter: String::new(),
            }),
        )
        .await
        .map_err(|_| self.timed_out(call))?
        .map_err(|s| self.grpc(call.into(), s))?;
        let mut list: Vec<String> = reply
            .into_inner()
            .namespaces
            .into_iter()
            .map(|n| n.name)
            .collect();
        list.sort_by_key(|n| (n != K8S_NAMESPACE, n.clone()));
        self.namespaces = Some((Instant::now(), list.clone()));
        Ok(list)
    }

    /// The container `r` names, from the namespace its cgroup names or else from each
    /// namespace in turn; `Ok(None)` when the socket is absent or no namespace has it.
    pub async fn inspect(&mut self, r: &CgroupRef) -> Result<Option<Meta>, ApiError> {
        if !self.socket.exists() {
            return Ok(None);
        }
        let result = self.find(r).await;
        if result.is_err() {
            // A broken connection is made again next time.
            self.channel = None;
        }
        result
    }

    async fn find(&mut self, r: &CgroupRef) -> Result<Option<Meta>, ApiError> {
        let namespaces = self.namespaces().await?;
        let candidates: Vec<String> = match r {
            CgroupRef::ContainerdCandidate { namespace, .. } => {
                namespaces.into_iter().filter(|n| n == namespace).collect()
            }
            _ => namespaces,
        };
        for namespace in candidates {
            if let Some(meta) = self.get(&namespace, r.id()).await? {
                return Ok(Some(meta));
            }
        }
        Ok(None)
    }

    async fn get(&mut self, namespace: &str, id: &str) -> Result<Option<Meta>, ApiError> {
        let call = format!("Containers/Get {id} in namespace {namespace}");
        let mut client = ContainersClient::new(self.channel().await?);
        let request = with_namespace!(GetContainerRequest { id: id.to_owned() }, namespace);
        let reply = tokio::time::timeout(self.timeout, client.get(request))
            .await
            .map_err(|_| self.timed_out(&call))?;
        let container = match reply {
            Ok(r) => r.into_inner().container,
            Err(s) if s.code() == Code::NotFound => return Ok(None),
            Err(s) => return Err(self.grpc(call, s)),
        };
        Ok(container.map(|c| {
            let labels: std::collections::HashMap<String, String> = c.labels.into_iter().collect();
            let sandbox = labels.get(CRI_KIND.0).map(String::as_str) == Some(CRI_KIND.1);
            // containerd has no names: nerdctl keeps one in a label, Kubernetes the spec's.
            let name = labels
                .get("nerdctl/name")
                .or_else(|| labels.get(super::K8S_CONTAINER))
                .cloned()
                .unwrap_or(c.id);
            Meta {
                name: Some(name),
                image: (!c.image.is_empty()).then_some(c.image),
                labels,
                sandbox,
            }
        }))
    }
}

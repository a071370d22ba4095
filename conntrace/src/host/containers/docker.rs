//! The Docker Engine API on a unix socket (`bollard`): Docker's own, and Podman's compatible
//! service (`podman system service`). One call per container, `GET /containers/{id}/json`, in
//! bollard's API version; `GET /version` (version negotiation) only when a daemon refuses it,
//! since Podman takes about a second to answer that one.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use bollard::Docker;

use super::{ApiError, Meta};

/// Clients of the Docker-compatible sockets given, each connected (and its API version
/// negotiated) on first use.
pub struct DockerApi {
    sockets: Vec<PathBuf>,
    clients: HashMap<PathBuf, Docker>,
    timeout: Duration,
}

/// The label Kubernetes' dockershim and cri-dockerd put on a pod's sandbox container.
const DOCKER_SANDBOX: (&str, &str) = ("io.kubernetes.docker.type", "podsandbox");

impl DockerApi {
    /// `sockets` are tried in order; every call is bounded by `timeout`.
    pub fn new(sockets: Vec<PathBuf>, timeout: Duration) -> Self {
        Self {
            sockets,
            clients: HashMap::new(),
            timeout,
        }
    }

    fn timed_out(&self, socket: &Path, call: &str, after: Duration) -> ApiError {
        ApiError::Timeout {
            api: format!("Docker Engine API at {}: {call}", socket.display()),
            after,
        }
    }

    /// The client of `socket`, speaking bollard's API version until the daemon refuses it.
    fn client(&mut self, socket: &Path) -> Result<Docker, ApiError> {
        if let Some(c) = self.clients.get(socket) {
            return Ok(c.clone());
        }
        let path = socket
            .to_str()
            .ok_or_else(|| ApiError::Path(socket.to_owned()))?;
        let secs = self.timeout.as_secs().max(1);
        let client = Docker::connect_with_unix(path, secs, bollard::API_DEFAULT_VERSION).map_err(
            |source| ApiError::Docker {
                socket: socket.to_owned(),
                call: "connect".into(),
                source,
            },
        )?;
        self.clients.insert(socket.to_owned(), client.clone());
        Ok(client)
    }

    /// Agrees on an API version with an older daemon (`GET /version`, which takes Podman
    /// about a second: allowed three times the bound of other calls).
    async fn negotiate(&mut self, socket: &Path, client: Docker) -> Result<Docker, ApiError> {
        let after = self.timeout * 3;
        let client = tokio::time::timeout(after, client.negotiate_version())
            .await
            .map_err(|_| self.timed_out(socket, "GET /version", after))?
            .map_err(|source| ApiError::Docker {
                socket: socket.to_owned(),
                call: "GET /version".into(),
                source,
            })?;
        self.clients.insert(socket.to_owned(), client.clone());
        Ok(client)
    }

    /// The container `id` as the first socket that knows it describes it; `Ok(None)` when no
    /// socket exists or none knows it. Errors name the socket and the call.
    pub async fn inspect(&mut self, id: &str) -> Result<Option<Meta>, ApiError> {
        let mut first_error = None;
        for socket in self.sockets.clone() {
            if !socket.exists() {
                continue;
            }
            match self.inspect_on(&socket, id).await {
                Ok(Some(meta)) => return Ok(Some(meta)),
                Ok(None) => {}
                Err(e) => {
                    // A broken connection is made again next time.
                    self.clients.remove(&socket);
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(None), Err)
    }

    async fn inspect_on(&mut self, socket: &Path, id: &str) -> Result<Option<Meta>, ApiError> {
        let call = format!("GET /containers/{id}/json");
        let mut client = self.client(socket)?;
        let mut negotiated = false;
        let c = loop {
            let answer = tokio::time::timeout(self.timeout, client.inspect_container(id, None))
                .await
                .map_err(|_| self.timed_out(socket, &call, self.timeout))?;
            match answer {
                Ok(c) => break c,
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => return Ok(None),
                // "client version 1.52 is too new": ask which one it speaks, once.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 400,
                    message,
                }) if message.contains("version") && !negotiated => {
                    negotiated = true;
                    client = self.negotiate(socket, client).await?;
                }
                Err(source) => {
                    return Err(ApiError::Docker {
                        socket: socket.to_owned(),
                        call,
                        source,
                    });
                }
            }
        };
        let config = c.config.unwrap_or_default();
        let labels = config.labels.unwrap_or_default();
        let sandbox = labels.get(DOCKER_SANDBOX.0).map(String::as_str) == Some(DOCKER_SANDBOX.1);
        Ok(Some(Meta {
            // Docker names start with `/`.
            name: c.name.map(|n| n.trim_start_matches('/').to_owned()),
            image: config.image.or(c.image),
            labels,
            sandbox,
        }))
    }
}

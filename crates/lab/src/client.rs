//! Talking to a lab's control plane over its unix socket: [`LabClient`] for requests and
//! [`LabSource`], the agent-side [`Source`] that follows the watch stream.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrum_model::{
    AgentReport, IpRequester, Kind, NncSpec, Object, ObjectRef, Source, SourceError, WatchEvent,
};
use k8s_openapi::api::core::v1::PodStatus;

use crate::api::{ApplyOutcome, Request, Response};
use crate::server::REALIZE_TIMEOUT;

/// Plain requests are answered at once; `wait` requests may take up to REALIZE_TIMEOUT.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no lab control plane at {}: is the lab up? (ferrum lab up --name {lab})", .socket.display())]
    LabDown { socket: PathBuf, lab: String },
    #[error("talking to the lab control plane at {}: {source}", .socket.display())]
    Io {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("unexpected answer from the lab control plane: {0}")]
    Protocol(String),
    /// The control plane refused the request; its message says why.
    #[error("{0}")]
    Server(String),
}

/// Requests to a lab's control plane, one connection per request.
#[derive(Debug, Clone)]
pub struct LabClient {
    socket: PathBuf,
}

impl LabClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn io_err(&self, source: std::io::Error) -> ClientError {
        ClientError::Io {
            socket: self.socket.clone(),
            source,
        }
    }

    /// Connects and sends one request line.
    fn send(&self, request: &Request) -> Result<UnixStream, ClientError> {
        let mut stream = UnixStream::connect(&self.socket).map_err(|e| match e.kind() {
            ErrorKind::NotFound | ErrorKind::ConnectionRefused => ClientError::LabDown {
                socket: self.socket.clone(),
                // The socket lives in the lab's run directory, named after the lab.
                lab: self
                    .socket
                    .parent()
                    .and_then(Path::file_name)
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "NAME".to_string()),
            },
            _ => self.io_err(e),
        })?;
        let mut line = serde_json::to_vec(request)
            .map_err(|e| ClientError::Protocol(format!("cannot encode request: {e}")))?;
        line.push(b'\n');
        stream.write_all(&line).map_err(|e| self.io_err(e))?;
        Ok(stream)
    }

    fn call(&self, request: &Request, timeout: Duration) -> Result<Response, ClientError> {
        let stream = self.send(request)?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| self.io_err(e))?;
        let mut line = String::new();
        let n = BufReader::new(stream)
            .read_line(&mut line)
            .map_err(|e| self.io_err(e))?;
        if n == 0 {
            return Err(ClientError::Protocol(
                "the control plane closed the connection without answering".to_string(),
            ));
        }
        match serde_json::from_str(&line) {
            Ok(Response::Error { message }) => Err(ClientError::Server(message)),
            Ok(response) => Ok(response),
            Err(e) => Err(ClientError::Protocol(format!("cannot decode answer: {e}"))),
        }
    }

    fn unexpected(response: Response) -> ClientError {
        ClientError::Protocol(format!("{response:?}"))
    }

    fn wait_timeout(wait: bool) -> Duration {
        if wait {
            REALIZE_TIMEOUT + ANSWER_TIMEOUT
        } else {
            ANSWER_TIMEOUT
        }
    }

    pub fn apply(&self, objects: Vec<Object>, wait: bool) -> Result<ApplyOutcome, ClientError> {
        match self.call(&Request::Apply { objects, wait }, Self::wait_timeout(wait))? {
            Response::Applied { outcome } => Ok(outcome),
            other => Err(Self::unexpected(other)),
        }
    }

    /// Deletes every referenced object; returns the store revision after the delete.
    pub fn delete(&self, refs: Vec<ObjectRef>, wait: bool) -> Result<u64, ClientError> {
        match self.call(&Request::Delete { refs, wait }, Self::wait_timeout(wait))? {
            Response::Revision { revision } => Ok(revision),
            other => Err(Self::unexpected(other)),
        }
    }

    pub fn list(&self, kind: Kind, namespace: Option<&str>) -> Result<Vec<Object>, ClientError> {
        let request = Request::List {
            kind,
            namespace: namespace.map(str::to_string),
        };
        match self.call(&request, ANSWER_TIMEOUT)? {
            Response::Objects { items } => Ok(items),
            other => Err(Self::unexpected(other)),
        }
    }

    pub fn get(&self, object: &ObjectRef) -> Result<Option<Object>, ClientError> {
        let request = Request::Get {
            object: object.clone(),
        };
        match self.call(&request, ANSWER_TIMEOUT)? {
            Response::Object { object } => Ok(object),
            other => Err(Self::unexpected(other)),
        }
    }

    pub fn update_pod_status(
        &self,
        namespace: &str,
        name: &str,
        status: PodStatus,
    ) -> Result<u64, ClientError> {
        let request = Request::UpdatePodStatus {
            namespace: namespace.to_string(),
            name: name.to_string(),
            status: Box::new(status),
        };
        match self.call(&request, ANSWER_TIMEOUT)? {
            Response::Revision { revision } => Ok(revision),
            other => Err(Self::unexpected(other)),
        }
    }

    pub fn report(&self, component: &str, report: AgentReport) -> Result<(), ClientError> {
        let request = Request::Report {
            component: component.to_string(),
            report,
        };
        match self.call(&request, ANSWER_TIMEOUT)? {
            Response::Ok => Ok(()),
            other => Err(Self::unexpected(other)),
        }
    }

    pub fn reports(&self) -> Result<BTreeMap<String, AgentReport>, ClientError> {
        match self.call(&Request::Reports, ANSWER_TIMEOUT)? {
            Response::Reports { reports } => Ok(reports),
            other => Err(Self::unexpected(other)),
        }
    }

    /// VNet mode: writes a node's NodeNetworkConfig spec (its address request).
    pub fn update_nnc_spec(&self, name: &str, spec: NncSpec) -> Result<u64, ClientError> {
        let request = Request::UpdateNncSpec {
            name: name.to_string(),
            spec,
        };
        match self.call(&request, ANSWER_TIMEOUT)? {
            Response::Revision { revision } => Ok(revision),
            other => Err(Self::unexpected(other)),
        }
    }

    pub fn revision(&self) -> Result<u64, ClientError> {
        match self.call(&Request::Revision, ANSWER_TIMEOUT)? {
            Response::Revision { revision } => Ok(revision),
            other => Err(Self::unexpected(other)),
        }
    }

    /// Opens a watch: a snapshot of Upserts, Synced, then live events.
    pub fn watch(&self) -> Result<WatchStream, ClientError> {
        let stream = self.send(&Request::Watch)?;
        Ok(WatchStream {
            reader: BufReader::new(stream),
        })
    }
}

/// The events of one watch connection.
pub struct WatchStream {
    reader: BufReader<UnixStream>,
}

impl WatchStream {
    /// The next event; `Ok(None)` when the control plane closed the stream.
    pub fn next_event(&mut self) -> Result<Option<WatchEvent>, ClientError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| ClientError::Io {
                socket: PathBuf::from("watch stream"),
                source: e,
            })?;
        if n == 0 {
            return Ok(None);
        }
        match serde_json::from_str(&line) {
            Ok(Response::Event { event }) => Ok(Some(event)),
            Ok(Response::Error { message }) => Err(ClientError::Server(message)),
            Ok(other) => Err(LabClient::unexpected(other)),
            Err(e) => Err(ClientError::Protocol(format!("cannot decode event: {e}"))),
        }
    }
}

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The lab control plane as a [`Source`]: follows the watch stream, reconnecting with backoff
/// (each reconnect starts over with a full listing); reports go as separate requests.
pub struct LabSource {
    client: LabClient,
    component: String,
    stream: Option<WatchStream>,
}

impl LabSource {
    /// Connects now, so a lab that is down is reported at once rather than retried forever.
    pub fn connect(socket: &Path, component: &str) -> Result<Self, ClientError> {
        let client = LabClient::new(socket);
        let stream = client.watch()?;
        Ok(Self {
            client,
            component: component.to_string(),
            stream: Some(stream),
        })
    }
}

impl Source for LabSource {
    fn next_event(&mut self) -> Result<WatchEvent, SourceError> {
        let mut backoff = BACKOFF_START;
        loop {
            let stream = match self.stream.as_mut() {
                Some(s) => s,
                None => match self.client.watch() {
                    Ok(s) => {
                        tracing::info!(component = %self.component, "watch reconnected; relisting");
                        self.stream = Some(s);
                        return Ok(WatchEvent::Relist);
                    }
                    Err(e) => {
                        tracing::warn!(component = %self.component, error = %e, retry_in = ?backoff, "watch reconnect failed");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                },
            };
            match stream.next_event() {
                Ok(Some(event)) => return Ok(event),
                Ok(None) => {
                    tracing::warn!(component = %self.component, "control plane closed the watch; reconnecting");
                }
                Err(ClientError::Protocol(message)) => return Err(SourceError::Protocol(message)),
                Err(e) => {
                    tracing::warn!(component = %self.component, error = %e, "watch failed; reconnecting");
                }
            }
            self.stream = None;
        }
    }

    fn report(&mut self, report: &AgentReport) -> Result<(), SourceError> {
        self.client
            .report(&self.component, report.clone())
            .map_err(|e| SourceError::Disconnected(e.to_string()))
    }

    fn ip_requester(&self) -> Option<Box<dyn IpRequester>> {
        Some(Box::new(self.client.clone()))
    }
}

impl IpRequester for LabClient {
    fn request_ips(&mut self, node: &str, spec: &NncSpec) -> Result<(), SourceError> {
        self.update_nnc_spec(node, spec.clone())
            .map(|_| ())
            .map_err(|e| SourceError::Disconnected(e.to_string()))
    }
}

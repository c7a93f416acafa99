//! One request/response exchange with the node agent over its unix socket (agent_api).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrum_agent_api::{AgentError, ErrorKind, Reply, Request, Response};
use ferrum_cni_types::{CniError, ErrorCode};

/// Generous: Allocate persists state before answering, and a busy node may be slow.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub enum CallError {
    /// Nothing listens on the socket (agent down, not started yet, wrong path).
    Unreachable {
        socket: PathBuf,
        source: std::io::Error,
    },
    /// Connected, but the exchange broke off (agent crashed or timed out mid-request).
    Exchange {
        socket: PathBuf,
        source: std::io::Error,
    },
    /// The agent answered something that is not an agent_api Response.
    BadReply { socket: PathBuf, detail: String },
    /// The agent refused the request.
    Agent(AgentError),
}

impl CallError {
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            CallError::Unreachable { .. } | CallError::Exchange { .. }
        )
    }

    /// Maps onto CNI codes. Unreachable and NotReady are transient (11). Exhausted is 999:
    /// the node's block stays full until pods go, which retrying cannot fix by itself.
    pub fn into_cni(self, what: &str) -> CniError {
        match self {
            CallError::Unreachable { socket, source } => CniError::new(
                ErrorCode::TryAgainLater,
                format!("{what}: the ferrum agent is unreachable; try again later"),
            )
            .with_details(format!(
                "agent socket {}: {source} (is ferrum-agent running on this node?)",
                socket.display()
            )),
            CallError::Exchange { socket, source } => CniError::new(
                ErrorCode::TryAgainLater,
                format!("{what}: the connection to the ferrum agent broke off; try again later"),
            )
            .with_details(format!("agent socket {}: {source}", socket.display())),
            CallError::BadReply { socket, detail } => CniError::new(
                ErrorCode::Other,
                format!("{what}: the ferrum agent sent a reply this plugin does not understand"),
            )
            .with_details(format!(
                "agent socket {}: {detail} (are ferrum-cni and ferrum-agent the same version?)",
                socket.display()
            )),
            CallError::Agent(e) => {
                let code = match e.kind {
                    ErrorKind::NotReady => ErrorCode::TryAgainLater,
                    ErrorKind::InvalidRequest => ErrorCode::InvalidConfig,
                    ErrorKind::Exhausted | ErrorKind::NotFound | ErrorKind::Internal => {
                        ErrorCode::Other
                    }
                };
                CniError::new(code, format!("{what}: {}", e.message))
                    .with_details(format!("agent error kind {:?}", e.kind))
            }
        }
    }
}

/// Sends one request and waits for its reply.
pub fn call(socket: &Path, request: &Request) -> Result<Reply, CallError> {
    let unreachable = |source| CallError::Unreachable {
        socket: socket.to_path_buf(),
        source,
    };
    let exchange = |source| CallError::Exchange {
        socket: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(exchange)?;
    stream
        .set_write_timeout(Some(SEND_TIMEOUT))
        .map_err(exchange)?;
    let mut line = serde_json::to_vec(request).map_err(|e| CallError::BadReply {
        socket: socket.to_path_buf(),
        detail: format!("cannot encode request: {e}"),
    })?;
    line.push(b'\n');
    stream.write_all(&line).map_err(exchange)?;
    stream.flush().map_err(exchange)?;

    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(exchange)?;
    if reply.trim().is_empty() {
        return Err(exchange(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the agent closed the connection without answering",
        )));
    }
    let response: Response =
        serde_json::from_str(reply.trim_end()).map_err(|e| CallError::BadReply {
            socket: socket.to_path_buf(),
            detail: format!("{e}: {}", reply.trim_end()),
        })?;
    Result::<Reply, AgentError>::from(response).map_err(CallError::Agent)
}

/// A reply of the wrong kind for the request.
pub fn unexpected(socket: &Path, request: &str, reply: &Reply) -> CallError {
    CallError::BadReply {
        socket: socket.to_path_buf(),
        detail: format!("unexpected answer to {request}: {reply:?}"),
    }
}

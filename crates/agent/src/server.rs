//! The CNI API server: a unix socket only root may use, one JSON request line and one JSON
//! response line per connection, one thread per connection.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use ferrum_agent_api::{AgentError, ErrorKind, Request, Response};

use crate::handler::{Dataplane, NodeState};

/// Longest request accepted (a GC with thousands of keys fits easily).
const MAX_REQUEST_BYTES: u64 = 4 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(30);

pub type SharedState<D> = Arc<Mutex<NodeState<D>>>;

/// Binds the socket: parent directory created 0700, a stale socket file replaced, the socket
/// itself 0600. Refuses if another agent is answering on the path.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .with_context(|| format!("creating the socket directory {}", parent.display()))?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "another agent is serving {}; stop it first or pick another --socket",
                    path.display()
                );
            }
            fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; remove it or pick another --socket",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to 0600", path.display()))?;
    Ok(listener)
}

/// Accepts connections forever, one thread each.
pub fn serve<D: Dataplane + 'static>(listener: UnixListener, state: SharedState<D>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let state = Arc::clone(&state);
                let spawned =
                    std::thread::Builder::new()
                        .name("cni-conn".into())
                        .spawn(move || {
                            if let Err(e) = serve_connection(stream, &state) {
                                tracing::warn!("CNI API connection: {e:#}");
                            }
                        });
                if let Err(e) = spawned {
                    tracing::error!("cannot start a thread for a CNI API connection: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("accepting a CNI API connection failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn serve_connection<D: Dataplane>(
    stream: UnixStream,
    state: &SharedState<D>,
) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let cred = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .context("reading the peer's credentials (SO_PEERCRED)")?;
    let response = if cred.uid() != 0 {
        tracing::warn!(
            uid = cred.uid(),
            pid = cred.pid(),
            "refused a non-root CNI API client"
        );
        Response::Err(AgentError::new(
            ErrorKind::InvalidRequest,
            "only root may use the ferrum agent socket",
        ))
    } else {
        let mut line = String::new();
        BufReader::new((&stream).take(MAX_REQUEST_BYTES))
            .read_line(&mut line)
            .context("reading the request")?;
        match serde_json::from_str::<Request>(line.trim_end()) {
            Ok(req) => {
                tracing::debug!(?req, "CNI API request");
                let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
                guard.handle(req).into()
            }
            Err(e) => Response::Err(AgentError::new(
                ErrorKind::InvalidRequest,
                format!("request is not a valid agent API request: {e}"),
            )),
        }
    };
    let mut out = serde_json::to_vec(&response).context("encoding the response")?;
    out.push(b'\n');
    (&stream).write_all(&out).context("writing the response")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::IpamStore;
    use crate::handler::tests::MemDataplane;
    use ferrum_agent_api::Reply;

    fn roundtrip(path: &Path, line: &str) -> Response {
        let mut s = UnixStream::connect(path).unwrap();
        s.write_all(line.as_bytes()).unwrap();
        let mut out = String::new();
        BufReader::new(s).read_line(&mut out).unwrap();
        serde_json::from_str(&out).unwrap()
    }

    #[test]
    fn socket_is_private_stale_file_replaced_and_requests_answered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/agent.sock");
        drop(bind(&path).unwrap());
        let parent_mode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(parent_mode & 0o777, 0o700);
        // The dropped listener left its socket file behind, as a killed agent does.
        assert!(path.exists());
        let listener = bind(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A second agent on the same path is refused while the first is listening.
        assert!(bind(&path).is_err());

        let store = IpamStore::open(&dir.path().join("state"), 250).unwrap();
        let state = Arc::new(Mutex::new(NodeState::new(
            store,
            MemDataplane::default(),
            1450,
        )));
        std::thread::spawn(move || serve(listener, state));

        let not_ready = roundtrip(&path, "{\"op\":\"status\"}\n");
        assert!(matches!(not_ready, Response::Err(e) if e.kind == ErrorKind::NotReady));
        let bad = roundtrip(&path, "{\"op\":\"frobnicate\"}\n");
        assert!(matches!(bad, Response::Err(e) if e.kind == ErrorKind::InvalidRequest));
        let release = roundtrip(
            &path,
            "{\"op\":\"release\",\"key\":{\"containerId\":\"x\",\"ifname\":\"eth0\"}}\n",
        );
        assert_eq!(release, Response::Ok(Reply::Done));
    }

    /// 200 CNI ADDs (Allocate) at once over the real socket, in both modes: 200 distinct
    /// addresses, all durable in the store.
    #[test]
    fn two_hundred_concurrent_allocations_get_distinct_addresses() {
        for vnet in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("agent.sock");
            let listener = bind(&path).unwrap();
            let mut store = IpamStore::open(&dir.path().join("state"), 250).unwrap();
            if vnet {
                store
                    .update(|p| {
                        *p = ferrum_ipam::Pool::with_subnet("10.225.0.0/16".parse().unwrap(), 250);
                        let set = (1..=256u32)
                            .map(|i| {
                                std::net::Ipv4Addr::from(
                                    u32::from(std::net::Ipv4Addr::new(10, 225, 4, 0)) + i,
                                )
                            })
                            .collect();
                        p.set_addresses(set).map(|_| ())
                    })
                    .unwrap();
            } else {
                store.set_block("10.244.3.0/24".parse().unwrap()).unwrap();
            }
            let mut node = NodeState::new(store, MemDataplane::default(), 1450);
            node.block_confirmed = true;
            node.not_ready_reason = None;
            let state = Arc::new(Mutex::new(node));
            let served = Arc::clone(&state);
            std::thread::spawn(move || serve(listener, served));
            let threads: Vec<_> = (0..200)
                .map(|i| {
                    let path = path.clone();
                    std::thread::spawn(move || {
                        let line = format!(
                            "{{\"op\":\"allocate\",\"key\":{{\"containerId\":\"c{i}\",\"ifname\":\"eth0\"}},\"netns\":\"/run/netns/p{i}\"}}\n"
                        );
                        match roundtrip(&path, &line) {
                            Response::Ok(Reply::Allocated(a)) => a.ip,
                            other => panic!("allocation {i}: {other:?}"),
                        }
                    })
                })
                .collect();
            let ips: std::collections::BTreeSet<_> =
                threads.into_iter().map(|t| t.join().unwrap()).collect();
            assert_eq!(ips.len(), 200, "vnet={vnet}: duplicate addresses");
            let reopened = IpamStore::open(&dir.path().join("state"), 250).unwrap();
            let stored: std::collections::BTreeSet<_> =
                reopened.pool().leases().map(|(_, l)| l.ip).collect();
            assert_eq!(
                stored, ips,
                "vnet={vnet}: store differs from what was answered"
            );
        }
    }
}

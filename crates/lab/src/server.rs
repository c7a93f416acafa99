//! The control plane on a unix socket (mode 0600): one thread per connection, one JSON request
//! line in, JSON response lines out (see [`crate::api`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::api::{Request, Response};
use crate::controlplane::{ControlPlane, CpError};

/// How long `wait` requests wait for every node to realize a change.
pub const REALIZE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often an idle watch checks whether its client or the server has gone away.
const WATCH_POLL: Duration = Duration::from_millis(500);
/// A client must send its request line within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A running server; dropping it (or [`ServerHandle::shutdown`]) stops accepting, ends the
/// watch streams and removes the socket.
pub struct ServerHandle {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl ServerHandle {
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept() so it sees the flag.
        let _ = UnixStream::connect(&self.socket);
        if let Some(thread) = self.accept.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Serves `cp` on `socket`, replacing a stale socket file but refusing to take over a live one.
pub fn serve(cp: ControlPlane, socket: &Path) -> Result<ServerHandle, CpError> {
    let serve_err = |source| CpError::Serve {
        socket: socket.to_path_buf(),
        source,
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(serve_err)?;
    }
    if socket.exists() {
        if UnixStream::connect(socket).is_ok() {
            return Err(CpError::AlreadyServing {
                socket: socket.to_path_buf(),
            });
        }
        std::fs::remove_file(socket).map_err(serve_err)?;
    }
    let listener = UnixListener::bind(socket).map_err(serve_err)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(serve_err)?;
    let stop = Arc::new(AtomicBool::new(false));
    let accept_stop = stop.clone();
    let accept = std::thread::Builder::new()
        .name("cp-accept".into())
        .spawn(move || accept_loop(listener, cp, accept_stop))
        .map_err(serve_err)?;
    tracing::info!(socket = %socket.display(), "control plane serving");
    Ok(ServerHandle {
        socket: socket.to_path_buf(),
        stop,
        accept: Some(accept),
    })
}

fn accept_loop(listener: UnixListener, cp: ControlPlane, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        match conn {
            Ok(stream) => {
                let cp = cp.clone();
                let stop = stop.clone();
                let spawned = std::thread::Builder::new()
                    .name("cp-conn".into())
                    .spawn(move || {
                        if let Err(e) = handle(stream, &cp, &stop) {
                            tracing::debug!(error = %e, "control-plane connection ended");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start a connection thread");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept on the control-plane socket failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn write_line(stream: &mut UnixStream, response: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

fn handle(mut stream: UnixStream, cp: &ControlPlane, stop: &AtomicBool) -> std::io::Result<()> {
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(stream.try_clone()?).read_line(&mut line)?;
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let message = format!("malformed request: {e}");
            return write_line(&mut stream, &Response::Error { message });
        }
    };
    if let Request::Watch = request {
        return stream_watch(stream, cp, stop);
    }
    let response = answer(cp, request).unwrap_or_else(|message| Response::Error { message });
    write_line(&mut stream, &response)
}

fn answer(cp: &ControlPlane, request: Request) -> Result<Response, String> {
    let wait_for = |revision: u64| {
        cp.wait_realized(revision, REALIZE_TIMEOUT).map_err(|e| {
            format!("the change is stored (revision {revision}) but not yet in every node's datapath: {e}")
        })
    };
    Ok(match request {
        Request::Apply { objects, wait } => {
            let outcome = cp.apply_from_user(objects).map_err(|e| e.to_string())?;
            if wait {
                wait_for(outcome.revision)?;
            }
            Response::Applied { outcome }
        }
        Request::Delete { refs, wait } => {
            let revision = cp.delete_from_user(refs).map_err(|e| e.to_string())?;
            if wait {
                wait_for(revision)?;
            }
            Response::Revision { revision }
        }
        Request::List { kind, namespace } => Response::Objects {
            items: cp.list(kind, namespace.as_deref()),
        },
        Request::Get { object } => Response::Object {
            object: cp.get(&object),
        },
        Request::UpdatePodStatus {
            namespace,
            name,
            status,
        } => Response::Revision {
            revision: cp
                .update_pod_status(&namespace, &name, *status)
                .map_err(|e| e.to_string())?,
        },
        Request::Report { component, report } => {
            cp.report(&component, report);
            Response::Ok
        }
        Request::Reports => Response::Reports {
            reports: cp.reports(),
        },
        Request::Revision => Response::Revision {
            revision: cp.revision(),
        },
        Request::UpdateNncSpec { name, spec } => Response::Revision {
            revision: cp.update_nnc_spec(&name, spec).map_err(|e| e.to_string())?,
        },
        Request::Watch => return Err("watch is a stream, not a request".to_string()),
    })
}

fn stream_watch(
    mut stream: UnixStream,
    cp: &ControlPlane,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let events = cp.subscribe();
    loop {
        match events.recv_timeout(WATCH_POLL) {
            Ok(event) => write_line(&mut stream, &Response::Event { event })?,
            Err(RecvTimeoutError::Timeout) => {
                if stop.load(Ordering::SeqCst) || client_gone(&stream) {
                    return Ok(());
                }
            }
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

/// A watching client sends nothing after its request, so a readable EOF means it left.
/// (Peeks without blocking; O_NONBLOCK would also affect the writes on the shared socket.)
fn client_gone(stream: &UnixStream) -> bool {
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 1];
    match recv(
        stream.as_raw_fd(),
        &mut buf,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_PEEK,
    ) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e != nix::errno::Errno::EAGAIN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApplyAction;
    use crate::client::{ClientError, LabClient, LabSource};
    use ferrum_model::{AgentReport, Kind, Object, ObjectRef, Source, WatchEvent, parse_documents};

    const NODE_AND_POD: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-0}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: c}]}\n";

    fn setup() -> (tempfile::TempDir, ControlPlane, ServerHandle, LabClient) {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::open(&dir.path().join("state")).unwrap();
        let socket = dir.path().join("run").join("cp.sock");
        let server = serve(cp.clone(), &socket).unwrap();
        let client = LabClient::new(&socket);
        (dir, cp, server, client)
    }

    #[test]
    fn requests_round_trip_over_the_socket() {
        let (_dir, cp, server, client) = setup();
        let mode = std::fs::metadata(server.socket())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let outcome = client
            .apply(parse_documents(NODE_AND_POD).unwrap(), false)
            .unwrap();
        assert_eq!(outcome.results[1].1, ApplyAction::Created);
        assert_eq!(client.revision().unwrap(), outcome.revision);
        let pods = client.list(Kind::Pod, Some("default")).unwrap();
        assert_eq!(pods.len(), 1);
        let a = ObjectRef::new(Kind::Pod, None, "a");
        assert!(client.get(&a).unwrap().is_some());
        let missing = ObjectRef::new(Kind::Pod, None, "zzz");
        assert!(client.get(&missing).unwrap().is_none());

        let err = client.delete(vec![missing], false).unwrap_err();
        assert!(
            matches!(&err, ClientError::Server(m) if m.contains("pod/zzz")),
            "{err}"
        );
        client.delete(vec![a.clone()], false).unwrap();
        assert!(client.get(&a).unwrap().is_none());

        // The socket is the user's path: lab-owned NodeNetworkConfigs are refused there.
        let nnc = ferrum_model::NodeNetworkConfig::new("node-0", 16);
        cp.apply(vec![Object::NodeNetworkConfig(nnc.clone())])
            .unwrap();
        for err in [
            client
                .apply(vec![Object::NodeNetworkConfig(nnc.clone())], false)
                .unwrap_err(),
            client
                .delete(vec![ObjectRef::of(&Object::NodeNetworkConfig(nnc))], false)
                .unwrap_err(),
        ] {
            assert!(
                matches!(&err, ClientError::Server(m) if m.contains("ferrum get nnc")),
                "{err}"
            );
        }

        let report = AgentReport {
            node: "node-0".into(),
            ready: true,
            realized_revision: 3,
            message: String::new(),
        };
        client.report("agent/node-0", report.clone()).unwrap();
        assert_eq!(client.reports().unwrap().get("agent/node-0"), Some(&report));
    }

    #[test]
    fn apply_with_wait_returns_once_a_report_arrives_from_another_thread() {
        let (_dir, cp, _server, client) = setup();
        let rev = cp
            .apply(parse_documents(NODE_AND_POD).unwrap())
            .unwrap()
            .revision;
        let reporter = {
            let socket = client.socket().to_path_buf();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                let c = LabClient::new(socket);
                for component in ["agent/node-0", "runtime/node-0"] {
                    let r = AgentReport {
                        node: "node-0".into(),
                        ready: true,
                        realized_revision: rev + 1,
                        message: String::new(),
                    };
                    c.report(component, r).unwrap();
                }
            })
        };
        let pod_b =
            "apiVersion: v1\nkind: Pod\nmetadata: {name: b}\nspec: {containers: [{name: c}]}\n";
        let started = std::time::Instant::now();
        let outcome = client.apply(parse_documents(pod_b).unwrap(), true).unwrap();
        assert_eq!(outcome.revision, rev + 1);
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "did not wait for the reports"
        );
        reporter.join().unwrap();
    }

    #[test]
    fn watch_streams_snapshot_and_live_events_and_source_reconnects() {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::open(&dir.path().join("state")).unwrap();
        let socket = dir.path().join("cp.sock");
        let server = serve(cp.clone(), &socket).unwrap();
        let mut source = LabSource::connect(&socket, "agent/node-0").unwrap();
        let mut snapshot = Vec::new();
        loop {
            let e = source.next_event().unwrap();
            let done = matches!(e, WatchEvent::Synced { .. });
            snapshot.push(e);
            if done {
                break;
            }
        }
        assert_eq!(
            snapshot.len(),
            3,
            "default, kube-system, Synced: {snapshot:?}"
        );
        let rev = cp
            .apply(parse_documents(NODE_AND_POD).unwrap())
            .unwrap()
            .revision;
        let mut names = Vec::new();
        loop {
            match source.next_event().unwrap() {
                WatchEvent::Upsert { object } => names.push(object.name().to_string()),
                WatchEvent::Synced { revision } => {
                    assert_eq!(revision, rev);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(names, ["node-0", "a"]);
        source
            .report(&AgentReport {
                node: "node-0".into(),
                ready: true,
                realized_revision: rev,
                message: String::new(),
            })
            .unwrap();
        assert_eq!(cp.reports()["agent/node-0"].realized_revision, rev);

        // Restart the server: the source reconnects and lists everything again.
        server.shutdown();
        let _server = serve(cp.clone(), &socket).unwrap();
        assert_eq!(source.next_event().unwrap(), WatchEvent::Relist);
        let mut relisted = Vec::new();
        loop {
            match source.next_event().unwrap() {
                WatchEvent::Upsert { object } => relisted.push(object.name().to_string()),
                WatchEvent::Synced { revision } => {
                    assert_eq!(revision, rev);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(relisted.contains(&"a".to_string()) && relisted.contains(&"node-0".to_string()));
    }

    #[test]
    fn a_missing_socket_says_the_lab_is_down() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("mylab").join("cp.sock");
        let err = LabClient::new(&socket).revision().unwrap_err().to_string();
        assert!(
            err.contains("is the lab up? (ferrum lab up --name mylab)"),
            "{err}"
        );
        assert!(LabSource::connect(&socket, "agent/x").is_err());
    }

    #[test]
    fn a_live_socket_is_not_taken_over() {
        let (_dir, cp, server, _client) = setup();
        let err = serve(cp, server.socket())
            .err()
            .expect("second server on a live socket");
        assert!(matches!(err, CpError::AlreadyServing { .. }), "{err}");
    }
}

//! Traffic between two namespaces: iperf3 throughput and a 1-byte TCP ping-pong.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferrum_datapath::netns::run_in_netns;
use serde_json::Value;

use super::check_interrupted;
use super::topo::Endpoints;

const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 7101;
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A child process killed and reaped on drop (an iperf3 server that never got its client).
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// One iperf3 run.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub gbit_per_s: f64,
    pub retransmits: u64,
}

/// iperf3, single stream, client in `ep.client_netns` to a one-off server in `ep.server_netns`.
pub fn iperf3(ep: &Endpoints, duration_secs: u64) -> Result<Throughput> {
    let port = IPERF_PORT.to_string();
    let server = Command::new("nsenter")
        .arg(format!("--net={}", ep.server_netns.display()))
        .args(["iperf3", "-s", "-1", "-p", &port, "-B"])
        .arg(ep.server_ip.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot run `nsenter ... iperf3 -s` (are util-linux and iperf3 installed?)")?;
    let mut server = ChildGuard(server);
    wait_listening(&ep.server_netns, IPERF_PORT, &mut server.0)?;

    let out = Command::new("nsenter")
        .arg(format!("--net={}", ep.client_netns.display()))
        .args(["iperf3", "-J", "-P", "1", "-p", &port, "-t"])
        .arg(duration_secs.to_string())
        .arg("-c")
        .arg(ep.server_ip.to_string())
        .stdin(Stdio::null())
        .output()
        .context("cannot run `nsenter ... iperf3 -c`")?;
    check_interrupted()?;
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 client to {} printed no JSON (exit {}): {}",
            ep.server_ip,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    if let Some(error) = report["error"].as_str() {
        bail!("iperf3 client to {} failed: {error}", ep.server_ip);
    }
    let bits = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 JSON has no end.sum_received: {report}"))?;
    Ok(Throughput {
        gbit_per_s: bits / 1e9,
        retransmits: report["end"]["sum_sent"]["retransmits"]
            .as_u64()
            .unwrap_or(0),
    })
}

/// Waits until something listens on TCP `port` in `netns` (without connecting, which would use
/// up a one-off iperf3 server).
fn wait_listening(netns: &Path, port: u16, server: &mut Child) -> Result<()> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    loop {
        // /proc/thread-self/net follows the namespace of the reading thread.
        let table = run_in_netns(netns, || {
            std::fs::read_to_string("/proc/thread-self/net/tcp")
        })?
        .context("reading /proc/net/tcp")?;
        if tcp_table_has_listener(&table, port) {
            return Ok(());
        }
        if let Some(status) = server.try_wait().context("waiting for iperf3 server")? {
            bail!(
                "iperf3 server in {} exited early with {status}",
                netns.display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "iperf3 server in {} did not listen on port {port} within {SETUP_TIMEOUT:?}",
                netns.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True when a /proc/net/tcp table has a socket in LISTEN (0A) on `port`.
pub fn tcp_table_has_listener(table: &str, port: u16) -> bool {
    let want = format!(":{port:04X}");
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1).unwrap_or_default();
        let state = fields.nth(1).unwrap_or_default();
        local.ends_with(&want) && state == "0A"
    })
}

/// Round-trip times of a 1-byte request / 1-byte reply over one TCP connection, in
/// microseconds, after `warmup` unmeasured rounds.
pub fn ping_pong(ep: &Endpoints, count: usize, warmup: usize) -> Result<Vec<f64>> {
    let server_ip = ep.server_ip;
    let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
    let server_netns = ep.server_netns.clone();
    let server = std::thread::spawn(move || -> Result<()> {
        run_in_netns(&server_netns, move || serve_pong(server_ip, ready_tx))?
    });
    let ready = ready_rx
        .recv_timeout(SETUP_TIMEOUT)
        .context("ping-pong server did not start");
    let client = match ready {
        Ok(Ok(())) => run_in_netns(&ep.client_netns, || {
            ping(SocketAddr::from((server_ip, RR_PORT)), count, warmup)
        })
        .map_err(anyhow::Error::from)
        .and_then(|r| r),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(e),
    };
    let served = server
        .join()
        .map_err(|_| anyhow::anyhow!("ping-pong server thread panicked"))?;
    let rtts = client?;
    served?;
    Ok(rtts)
}

fn serve_pong(ip: std::net::Ipv4Addr, ready: mpsc::Sender<Result<()>>) -> Result<()> {
    let listener = match TcpListener::bind((ip, RR_PORT)) {
        Ok(l) => l,
        Err(e) => {
            let err = anyhow::anyhow!("ping-pong server cannot bind {ip}:{RR_PORT}: {e}");
            let _ = ready.send(Err(anyhow::anyhow!("{err}")));
            return Err(err);
        }
    };
    let _ = ready.send(Ok(()));
    // Accept with a deadline so a client that never comes does not hang the run.
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!("no ping-pong client connected to {ip}:{RR_PORT}");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("ping-pong accept"),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte).context("ping-pong server read")? {
            0 => return Ok(()),
            _ => stream.write_all(&byte).context("ping-pong server write")?,
        }
    }
}

fn ping(addr: SocketAddr, count: usize, warmup: usize) -> Result<Vec<f64>> {
    let mut stream = TcpStream::connect_timeout(&addr, SETUP_TIMEOUT)
        .with_context(|| format!("ping-pong connect to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut rtts = Vec::with_capacity(count);
    let mut byte = [b'x'];
    for round in 0..warmup + count {
        if round % 1024 == 0 {
            check_interrupted()?;
        }
        let start = Instant::now();
        stream.write_all(&byte).context("ping-pong client write")?;
        stream
            .read_exact(&mut byte)
            .context("ping-pong client read")?;
        let rtt = start.elapsed();
        if round >= warmup {
            rtts.push(rtt.as_secs_f64() * 1e6);
        }
    }
    Ok(rtts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_is_found_by_port_and_state() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0200FF0A:1451 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000 100 0 0 10 0\n   1: 0200FF0A:1B9D 0100FF0A:8000 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000 100 0 0 10 0\n";
        assert!(tcp_table_has_listener(table, 5201));
        // Port 7069 exists but is ESTABLISHED, not LISTEN.
        assert!(!tcp_table_has_listener(table, 7069));
        assert!(!tcp_table_has_listener(table, 80));
    }
}

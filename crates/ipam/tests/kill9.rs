//! Crash safety at the process level: a child process allocates and releases addresses through
//! the store as fast as it can and is killed with SIGKILL at random instants. After every kill
//! the store must open, hold no address twice, and hold exactly the acknowledged state (plus or
//! minus the one operation that was in flight). Runs for both modes.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferrum_ipam::Store;

type S = Store<u32, u32>;

const DIR_ENV: &str = "FERRUM_KILL9_DIR";
const MODE_ENV: &str = "FERRUM_KILL9_MODE";
const KEYS: u32 = 300;

struct Rng(u64);
impl Rng {
    fn seeded() -> Self {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Rng(t | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn open(dir: &std::path::Path, vnet: bool) -> S {
    let mut s = S::open(dir, 250).expect("the store must open after a crash");
    if s.pool().block().is_none() {
        if vnet {
            // VNet: the pod subnet with 256 addresses assigned to this node.
            s.update(|p| {
                *p = ferrum_ipam::Pool::with_subnet("10.225.0.0/16".parse().unwrap(), 250);
                let set = (0..256u32)
                    .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 225, 1, 0)) + i + 1))
                    .collect();
                p.set_addresses(set).map(|_| ())
            })
            .unwrap();
        } else {
            s.set_block("10.244.7.0/24".parse().unwrap()).unwrap();
        }
    }
    s
}

/// The child: announce each operation ("B"), do it durably, acknowledge it ("A").
#[test]
fn kill9_worker() {
    let Some(dir) = std::env::var_os(DIR_ENV) else {
        return; // only meaningful as the child of kill9_*
    };
    let vnet = std::env::var(MODE_ENV).as_deref() == Ok("vnet");
    let mut s = open(std::path::Path::new(&dir), vnet);
    let mut rng = Rng::seeded();
    let mut out = std::io::stdout().lock();
    loop {
        let key = rng.below(u64::from(KEYS)) as u32;
        if rng.below(3) < 2 {
            writeln!(out, "B alloc {key}").unwrap();
            out.flush().unwrap();
            match s.allocate(key, key) {
                Ok((ip, _)) => writeln!(out, "A alloc {key} {ip}").unwrap(),
                Err(_) => writeln!(out, "A full {key}").unwrap(),
            }
        } else {
            writeln!(out, "B release {key}").unwrap();
            out.flush().unwrap();
            s.release(&key).unwrap();
            writeln!(out, "A release {key}").unwrap();
        }
        out.flush().unwrap();
    }
}

fn state(s: &S) -> BTreeMap<u32, Ipv4Addr> {
    s.pool().leases().map(|(k, l)| (*k, l.ip)).collect()
}

fn run(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let vnet = mode == "vnet";
    drop(open(dir.path(), vnet));
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng::seeded();
    let mut total_acked = 0;
    for round in 0..12 {
        let before = state(&open(dir.path(), vnet));
        let mut child = Command::new(&exe)
            .args(["--exact", "kill9_worker", "--nocapture", "--test-threads=1"])
            .env(DIR_ENV, dir.path())
            .env(MODE_ENV, mode)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(60 + rng.below(200)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let text = {
            let mut lines = Vec::new();
            for line in BufReader::new(child.stdout.take().unwrap()).lines() {
                lines.push(line.unwrap());
            }
            lines
        };
        // Replay the acknowledged operations on the state before the round.
        let mut expected = before.clone();
        let mut in_flight: Option<(String, u32)> = None;
        for line in &text {
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.as_slice() {
                ["B", op, key] => in_flight = Some((op.to_string(), key.parse().unwrap())),
                ["A", "alloc", key, ip] => {
                    let key: u32 = key.parse().unwrap();
                    let ip: Ipv4Addr = ip.parse().unwrap();
                    if let Some(old) = expected.insert(key, ip) {
                        assert_eq!(old, ip, "allocation of {key} is not idempotent");
                    }
                    in_flight = None;
                    total_acked += 1;
                }
                ["A", "full", _] => in_flight = None,
                ["A", "release", key] => {
                    expected.remove(&key.parse::<u32>().unwrap());
                    in_flight = None;
                    total_acked += 1;
                }
                _ => {} // test harness chatter, or a line torn by the kill
            }
        }
        let after = open(dir.path(), vnet);
        let actual = state(&after);
        let mut ips: Vec<Ipv4Addr> = actual.values().copied().collect();
        ips.sort();
        ips.dedup();
        assert_eq!(
            ips.len(),
            actual.len(),
            "round {round}: an address is held twice"
        );
        let matches = actual == expected
            || match &in_flight {
                Some((op, key)) if op == "alloc" => {
                    let mut with = expected.clone();
                    actual
                        .get(key)
                        .is_some_and(|ip| with.insert(*key, *ip).is_none() && with == actual)
                }
                Some((op, key)) if op == "release" => {
                    let mut without = expected.clone();
                    without.remove(key);
                    without == actual
                }
                _ => false,
            };
        assert!(
            matches,
            "round {round}: store after SIGKILL differs from the acknowledged state \
             (in flight: {in_flight:?})\nexpected {expected:?}\nactual {actual:?}"
        );
        assert_eq!(
            after.pool().free() + after.pool().used(),
            after.pool().capacity()
        );
    }
    assert!(
        total_acked > 20,
        "the child did too little work to prove anything ({total_acked} ops)"
    );
    eprintln!("{mode}: {total_acked} acknowledged operations across 12 SIGKILLs");
}

#[test]
fn kill9_overlay_never_duplicates_or_loses_acknowledged_state() {
    run("overlay");
}

#[test]
fn kill9_vnet_never_duplicates_or_loses_acknowledged_state() {
    run("vnet");
}

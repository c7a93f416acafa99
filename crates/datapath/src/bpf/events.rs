//! Drop and trace events from the `ferrum_events` ring buffer.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};

use super::DatapathError;
use super::abi::{EVENT_FLAG_REPLY, EVENT_SIZE, RawEvent, addr_from_raw, port_from_raw};

/// Why a packet was dropped, or where a traced packet was observed. Codes are stable: they are
/// the values the programs write (bpf/ferrum.h, `enum ferrum_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    SpoofedIp,
    SpoofedMac,
    UnsupportedL3,
    UnknownEndpoint,
    NoTunnelEndpoint,
    NatNoPort,
    Malformed,
    EncapFailed,
    RewriteFailed,
    /// A Service had no usable backend; the client got an ICMP port unreachable.
    NoBackend,
    /// The client is not in the Service's loadBalancerSourceRanges.
    LbSourceDenied,
    /// NetworkPolicy: the source pod's egress does not allow the connection.
    PolicyEgress,
    /// NetworkPolicy: the destination pod's ingress does not allow the connection.
    PolicyIngress,
    ToEndpoint,
    ToOverlay,
    ToStack,
    FromOverlay,
    Snat,
    RevSnat,
    LbDnat,
    LbRevDnat,
    /// A code this build does not know (a newer program wrote it).
    Unknown(u8),
}

impl Reason {
    pub const ALL: [Reason; 21] = [
        Reason::PolicyEgress,
        Reason::PolicyIngress,
        Reason::SpoofedIp,
        Reason::SpoofedMac,
        Reason::UnsupportedL3,
        Reason::UnknownEndpoint,
        Reason::NoTunnelEndpoint,
        Reason::NatNoPort,
        Reason::Malformed,
        Reason::EncapFailed,
        Reason::RewriteFailed,
        Reason::ToEndpoint,
        Reason::ToOverlay,
        Reason::ToStack,
        Reason::FromOverlay,
        Reason::Snat,
        Reason::RevSnat,
        Reason::NoBackend,
        Reason::LbSourceDenied,
        Reason::LbDnat,
        Reason::LbRevDnat,
    ];

    pub fn code(&self) -> u8 {
        match self {
            Reason::SpoofedIp => 1,
            Reason::SpoofedMac => 2,
            Reason::UnsupportedL3 => 3,
            Reason::UnknownEndpoint => 4,
            Reason::NoTunnelEndpoint => 5,
            Reason::NatNoPort => 6,
            Reason::Malformed => 7,
            Reason::EncapFailed => 8,
            Reason::RewriteFailed => 9,
            Reason::ToEndpoint => 64,
            Reason::ToOverlay => 65,
            Reason::ToStack => 66,
            Reason::FromOverlay => 67,
            Reason::Snat => 68,
            Reason::RevSnat => 69,
            Reason::NoBackend => 20,
            Reason::LbSourceDenied => 21,
            Reason::PolicyEgress => 30,
            Reason::PolicyIngress => 31,
            Reason::LbDnat => 80,
            Reason::LbRevDnat => 81,
            Reason::Unknown(code) => *code,
        }
    }

    pub fn from_code(code: u8) -> Reason {
        Reason::ALL
            .into_iter()
            .find(|r| r.code() == code)
            .unwrap_or(Reason::Unknown(code))
    }

    pub fn text(&self) -> &'static str {
        match self {
            Reason::SpoofedIp => "SPOOFED_IP",
            Reason::SpoofedMac => "SPOOFED_MAC",
            Reason::UnsupportedL3 => "UNSUPPORTED_L3",
            Reason::UnknownEndpoint => "UNKNOWN_ENDPOINT",
            Reason::NoTunnelEndpoint => "NO_TUNNEL_ENDPOINT",
            Reason::NatNoPort => "NAT_NO_PORT",
            Reason::Malformed => "MALFORMED",
            Reason::EncapFailed => "ENCAP_FAILED",
            Reason::RewriteFailed => "REWRITE_FAILED",
            Reason::ToEndpoint => "TO_ENDPOINT",
            Reason::ToOverlay => "TO_OVERLAY",
            Reason::ToStack => "TO_STACK",
            Reason::FromOverlay => "FROM_OVERLAY",
            Reason::Snat => "SNAT",
            Reason::RevSnat => "REV_SNAT",
            Reason::NoBackend => "NO_BACKEND",
            Reason::LbSourceDenied => "LB_SOURCE_DENIED",
            Reason::PolicyEgress => "POLICY_DENIED_EGRESS",
            Reason::PolicyIngress => "POLICY_DENIED_INGRESS",
            Reason::LbDnat => "LB_DNAT",
            Reason::LbRevDnat => "LB_REV_DNAT",
            Reason::Unknown(_) => "UNKNOWN",
        }
    }

    /// Drop reasons have codes below 64; observation points start at 64.
    pub fn is_drop(&self) -> bool {
        self.code() < 64
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Unknown(code) => write!(f, "UNKNOWN({code})"),
            other => f.write_str(other.text()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    Drop,
    Trace,
    Unknown(u8),
}

/// One decoded ring-buffer record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub reason: Reason,
    /// Interface the program ran on (skb->ifindex).
    pub ifindex: u32,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP); 0 when the packet was not IPv4.
    pub proto: u8,
    /// Source address and port (ICMP echo: the echo id of a request).
    pub src: SocketAddrV4,
    /// Destination address and port (ICMP echo: the echo id of a reply).
    pub dst: SocketAddrV4,
    pub tunnel_endpoint: Option<Ipv4Addr>,
    /// The translated address/port for SNAT (node side) and reverse SNAT (pod side).
    pub nat: Option<SocketAddrV4>,
    /// CLOCK_MONOTONIC nanoseconds when the program ran.
    pub timestamp_ns: u64,
    /// The TCP header's flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// The ICMP type (0 for other protocols, and for echo replies).
    pub icmp_type: u8,
    /// The datapath knows the packet is a reply of a connection (reverse SNAT).
    pub is_reply: bool,
    /// The policy rule that decided (0: none, or no policy stage yet).
    pub rule_id: u32,
    /// The Service frontend a translated packet went through (0: none).
    pub service_id: u32,
}

impl Event {
    pub(crate) fn decode(bytes: &[u8]) -> Option<Event> {
        if bytes.len() < EVENT_SIZE {
            return None;
        }
        // SAFETY: RawEvent is plain old data and the slice holds at least EVENT_SIZE bytes;
        // read_unaligned copes with the ring's 8-byte record alignment or less.
        let raw: RawEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let kind = match raw.kind {
            1 => EventKind::Drop,
            2 => EventKind::Trace,
            other => EventKind::Unknown(other),
        };
        let nat_addr = addr_from_raw(raw.nat_addr);
        Some(Event {
            kind,
            reason: Reason::from_code(raw.reason),
            ifindex: raw.ifindex,
            proto: raw.proto,
            src: SocketAddrV4::new(addr_from_raw(raw.saddr), port_from_raw(raw.sport)),
            dst: SocketAddrV4::new(addr_from_raw(raw.daddr), port_from_raw(raw.dport)),
            tunnel_endpoint: (raw.tunnel_endpoint != 0).then(|| addr_from_raw(raw.tunnel_endpoint)),
            nat: (raw.nat_addr != 0)
                .then(|| SocketAddrV4::new(nat_addr, port_from_raw(raw.nat_port))),
            timestamp_ns: raw.ts_ns,
            tcp_flags: raw.tcp_flags,
            icmp_type: raw.icmp_type,
            is_reply: raw.ev_flags & EVENT_FLAG_REPLY != 0,
            rule_id: raw.rule_id,
            service_id: raw.service_id,
        })
    }
}

/// Reader of the events ring buffer (the agent takes it once and polls it from one task).
pub struct EventReader {
    pub(crate) ring: RingBuf<MapData>,
}

impl EventReader {
    /// Returns the events available now, waiting up to `timeout` for the first one.
    pub fn poll(&mut self, timeout: Duration) -> Result<Vec<Event>, DatapathError> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.drain();
            if !events.is_empty() {
                return Ok(events);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(events);
            }
            let millis = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            let mut fd = libc::pollfd {
                fd: self.ring.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd that lives across the call.
            if unsafe { libc::poll(&mut fd, 1, millis) } < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(DatapathError::Events {
                        op: "poll the ferrum_events ring buffer",
                        source: error,
                    });
                }
            }
        }
    }

    fn drain(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(item) = self.ring.next() {
            match Event::decode(&item) {
                Some(event) => events.push(event),
                None => tracing::warn!(len = item.len(), "short record in ferrum_events ignored"),
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for reason in Reason::ALL {
            assert!(
                seen.insert(reason.code()),
                "duplicate code {}",
                reason.code()
            );
            assert_eq!(Reason::from_code(reason.code()), reason);
        }
        assert_eq!(Reason::from_code(200), Reason::Unknown(200));
        assert!(Reason::SpoofedIp.is_drop());
        assert!(!Reason::Snat.is_drop());
    }

    #[test]
    fn decodes_a_raw_event() {
        let raw = RawEvent {
            ts_ns: 7,
            kind: 1,
            reason: 2,
            proto: 6,
            ifindex: 9,
            saddr: u32::from_ne_bytes([10, 0, 0, 1]),
            daddr: u32::from_ne_bytes([10, 0, 0, 2]),
            sport: 1234u16.to_be(),
            dport: 80u16.to_be(),
            tunnel_endpoint: u32::from_ne_bytes([192, 168, 0, 1]),
            tcp_flags: 0x12,
            rule_id: 77,
            service_id: 5,
            ev_flags: 1,
            ..RawEvent::default()
        };
        // SAFETY: RawEvent is repr(C) plain old data.
        let bytes: [u8; EVENT_SIZE] = unsafe { std::mem::transmute(raw) };
        let event = Event::decode(&bytes).expect("full record decodes");
        assert_eq!(event.kind, EventKind::Drop);
        assert_eq!(event.reason, Reason::SpoofedMac);
        assert_eq!(event.src, "10.0.0.1:1234".parse().unwrap());
        assert_eq!(event.dst, "10.0.0.2:80".parse().unwrap());
        assert_eq!(event.tunnel_endpoint, Some(Ipv4Addr::new(192, 168, 0, 1)));
        assert_eq!(event.nat, None);
        assert_eq!(event.tcp_flags, 0x12);
        assert!(event.is_reply);
        assert_eq!((event.rule_id, event.service_id), (77, 5));
        assert!(Event::decode(&bytes[..10]).is_none());
    }
}

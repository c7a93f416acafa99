//! Builds and checks Ethernet/IPv4 frames for BPF_PROG_TEST_RUN tests and benchmarks.
//! Pure code: no syscalls.

use std::net::{Ipv4Addr, SocketAddrV4};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
const ETH_HLEN: usize = 14;
const IP_HLEN: usize = 20;

pub type Mac = [u8; 6];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("frame too short: {0}")]
    Truncated(&'static str),
    #[error("not an IPv4 frame (ethertype {0:#06x})")]
    NotIpv4(u16),
    #[error("bad IPv4 header checksum")]
    BadIpChecksum,
    #[error("bad {0} checksum")]
    BadL4Checksum(&'static str),
}

/// Internet checksum (RFC 1071) over `data`, starting from a partial sum.
fn sum16(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        acc += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

pub fn checksum(data: &[u8]) -> u16 {
    fold(sum16(0, data))
}

fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut acc = sum16(0, &src.octets());
    acc = sum16(acc, &dst.octets());
    acc + u32::from(proto) + len as u32
}

pub fn ethernet(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETH_HLEN + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// IPv4 packet (no options, DF set, TTL 64) with a valid header checksum.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = (IP_HLEN + payload.len()) as u16;
    let mut pkt = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0];
    pkt[2..4].copy_from_slice(&total.to_be_bytes());
    pkt.extend_from_slice(&src.octets());
    pkt.extend_from_slice(&dst.octets());
    let csum = checksum(&pkt);
    pkt[10..12].copy_from_slice(&csum.to_be_bytes());
    pkt.extend_from_slice(payload);
    pkt
}

/// TCP segment (SYN when `syn`, else ACK) with a valid checksum.
pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, syn: bool, payload: &[u8]) -> Vec<u8> {
    tcp_with_flags(src, dst, if syn { TCP_SYN } else { TCP_ACK }, payload)
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// TCP segment with the given flags (`TCP_*`) and a valid checksum.
pub fn tcp_with_flags(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut seg = Vec::with_capacity(20 + payload.len());
    seg.extend_from_slice(&src.port().to_be_bytes());
    seg.extend_from_slice(&dst.port().to_be_bytes());
    seg.extend_from_slice(&1000u32.to_be_bytes());
    seg.extend_from_slice(&0u32.to_be_bytes());
    seg.push(5 << 4);
    seg.push(flags);
    seg.extend_from_slice(&64240u16.to_be_bytes());
    seg.extend_from_slice(&[0, 0, 0, 0]);
    seg.extend_from_slice(payload);
    let acc = pseudo_header_sum(*src.ip(), *dst.ip(), PROTO_TCP, seg.len());
    let csum = fold(sum16(acc, &seg));
    seg[16..18].copy_from_slice(&csum.to_be_bytes());
    seg
}

/// UDP datagram; `with_checksum == false` leaves the checksum 0 (allowed for IPv4).
pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8], with_checksum: bool) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut dgram = Vec::with_capacity(len as usize);
    dgram.extend_from_slice(&src.port().to_be_bytes());
    dgram.extend_from_slice(&dst.port().to_be_bytes());
    dgram.extend_from_slice(&len.to_be_bytes());
    dgram.extend_from_slice(&[0, 0]);
    dgram.extend_from_slice(payload);
    if with_checksum {
        let acc = pseudo_header_sum(*src.ip(), *dst.ip(), PROTO_UDP, dgram.len());
        let csum = match fold(sum16(acc, &dgram)) {
            0 => 0xffff,
            c => c,
        };
        dgram[6..8].copy_from_slice(&csum.to_be_bytes());
    }
    dgram
}

/// ICMP echo request (`request`) or reply with a valid checksum.
pub fn icmp_echo(request: bool, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut msg = vec![if request { 8 } else { 0 }, 0, 0, 0];
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(payload);
    let csum = checksum(&msg);
    msg[2..4].copy_from_slice(&csum.to_be_bytes());
    msg
}

/// ICMP error (`icmp_type`/`code`, e.g. 3/4 "fragmentation needed") whose second header word
/// is `rest` (for 3/4: unused, next-hop MTU) and which quotes `quoted` (an IPv4 packet or its
/// start), with a valid checksum.
pub fn icmp_error(icmp_type: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut msg = vec![icmp_type, code, 0, 0];
    msg.extend_from_slice(&rest);
    msg.extend_from_slice(quoted);
    let csum = checksum(&msg);
    msg[2..4].copy_from_slice(&csum.to_be_bytes());
    msg
}

pub fn tcp_frame(
    src_mac: Mac,
    dst_mac: Mac,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    let seg = tcp(src, dst, true, payload);
    ethernet(
        dst_mac,
        src_mac,
        ETH_P_IP,
        &ipv4(*src.ip(), *dst.ip(), PROTO_TCP, &seg),
    )
}

/// Like [`tcp_frame`] with the given TCP flags (`TCP_*`).
pub fn tcp_frame_flags(
    src_mac: Mac,
    dst_mac: Mac,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    flags: u8,
) -> Vec<u8> {
    let seg = tcp_with_flags(src, dst, flags, b"");
    ethernet(
        dst_mac,
        src_mac,
        ETH_P_IP,
        &ipv4(*src.ip(), *dst.ip(), PROTO_TCP, &seg),
    )
}

pub fn udp_frame(
    src_mac: Mac,
    dst_mac: Mac,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
    with_checksum: bool,
) -> Vec<u8> {
    let dgram = udp(src, dst, payload, with_checksum);
    ethernet(
        dst_mac,
        src_mac,
        ETH_P_IP,
        &ipv4(*src.ip(), *dst.ip(), PROTO_UDP, &dgram),
    )
}

pub fn icmp_echo_frame(
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    request: bool,
    id: u16,
) -> Vec<u8> {
    let msg = icmp_echo(request, id, 1, b"ferrum-ping");
    ethernet(
        dst_mac,
        src_mac,
        ETH_P_IP,
        &ipv4(src, dst, PROTO_ICMP, &msg),
    )
}

/// ARP request (op 1) or reply (op 2) for IPv4 over Ethernet.
pub fn arp_frame(op: u16, sha: Mac, sip: Ipv4Addr, tha: Mac, tip: Ipv4Addr) -> Vec<u8> {
    let mut arp = vec![0, 1, 0x08, 0x00, 6, 4];
    arp.extend_from_slice(&op.to_be_bytes());
    arp.extend_from_slice(&sha);
    arp.extend_from_slice(&sip.octets());
    arp.extend_from_slice(&tha);
    arp.extend_from_slice(&tip.octets());
    let dst = if op == 1 { [0xff; 6] } else { tha };
    ethernet(dst, sha, ETH_P_ARP, &arp)
}

/// A minimal IPv6 frame (ICMPv6-less, no payload) to exercise the "not IPv4" branches.
pub fn ipv6_frame(src_mac: Mac, dst_mac: Mac) -> Vec<u8> {
    let mut ip6 = vec![0x60, 0, 0, 0, 0, 0, 59, 64];
    ip6.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    ip6.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    ethernet(dst_mac, src_mac, ETH_P_IPV6, &ip6)
}

const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

/// Splits an Ethernet + IPv4 frame (no IP options) into fragments as a router would (RFC 791):
/// each carries at most `max_payload` bytes of the datagram's payload (rounded down to a
/// multiple of 8), all have IP id `id`, DF is cleared, and the last has MF clear.
pub fn fragment(frame: &[u8], id: u16, max_payload: usize) -> Vec<Vec<u8>> {
    let (l4, end) = l4_bounds(frame).expect("an IPv4 frame");
    assert_eq!(l4, ETH_HLEN + IP_HLEN, "no IP options");
    let chunk = max_payload / 8 * 8;
    assert!(chunk > 0, "fragments carry at least 8 bytes");
    let payload = &frame[l4..end];
    payload
        .chunks(chunk)
        .enumerate()
        .map(|(i, part)| {
            let mut ip = frame[ETH_HLEN..l4].to_vec();
            let more = (i + 1) * chunk < payload.len();
            let flags = ((i * chunk / 8) as u16) | if more { IP_MF } else { 0 };
            ip[2..4].copy_from_slice(&((IP_HLEN + part.len()) as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&id.to_be_bytes());
            ip[6..8].copy_from_slice(&flags.to_be_bytes());
            ip[10..12].copy_from_slice(&[0, 0]);
            let csum = checksum(&ip);
            ip[10..12].copy_from_slice(&csum.to_be_bytes());
            ip.extend_from_slice(part);
            let mut out = frame[..ETH_HLEN].to_vec();
            out.extend_from_slice(&ip);
            out
        })
        .collect()
}

/// (IP id, more fragments, offset in bytes) of an Ethernet + IPv4 frame.
pub fn fragment_info(frame: &[u8]) -> Result<(u16, bool, usize), PacketError> {
    l4_bounds(frame)?;
    let ip = &frame[ETH_HLEN..];
    let flags = u16::from_be_bytes([ip[6], ip[7]]);
    Ok((
        u16::from_be_bytes([ip[4], ip[5]]),
        flags & IP_MF != 0,
        usize::from(flags & IP_OFFSET_MASK) * 8,
    ))
}

/// Joins the fragments of one datagram (in any order) into a single frame: the first
/// fragment's Ethernet and IP header (fragment fields cleared, checksum recomputed) and the
/// payloads at their offsets. Every fragment's IP header checksum must hold.
pub fn reassemble(fragments: &[Vec<u8>]) -> Result<Vec<u8>, PacketError> {
    let mut parts = Vec::new();
    for frag in fragments {
        let (l4, end) = l4_bounds(frag)?;
        if checksum(&frag[ETH_HLEN..l4]) != 0 {
            return Err(PacketError::BadIpChecksum);
        }
        let (_, more, offset) = fragment_info(frag)?;
        parts.push((offset, more, frag, l4, end));
    }
    parts.sort_by_key(|p| p.0);
    let (first_offset, _, first, first_l4, _) =
        parts.first().ok_or(PacketError::Truncated("no fragment"))?;
    if *first_offset != 0 || parts.last().is_some_and(|p| p.1) {
        return Err(PacketError::Truncated("a fragment is missing"));
    }
    let mut payload = Vec::new();
    for (offset, _, frag, l4, end) in &parts {
        if *offset != payload.len() {
            return Err(PacketError::Truncated("a fragment is missing"));
        }
        payload.extend_from_slice(&frag[*l4..*end]);
    }
    let mut ip = first[ETH_HLEN..*first_l4].to_vec();
    let total = (ip.len() + payload.len()) as u16;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6..8].copy_from_slice(&[0, 0]);
    ip[10..12].copy_from_slice(&[0, 0]);
    let csum = checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let mut out = first[..ETH_HLEN].to_vec();
    out.extend_from_slice(&ip);
    out.extend_from_slice(&payload);
    Ok(out)
}

/// VXLAN (RFC 7348) over IPv4 and UDP, as the kernel's VXLAN device and the datapath send it.
pub const VXLAN_HLEN: usize = 8;
const VXLAN_FLAG_VNI: u8 = 0x08;

/// A VXLAN packet carrying `inner` (a whole Ethernet frame) for `vni`, from src to dst (UDP
/// checksum 0, as the datapath sends it).
pub fn vxlan_frame(
    src_mac: Mac,
    dst_mac: Mac,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    vni: u32,
    inner: &[u8],
) -> Vec<u8> {
    let mut payload = vec![VXLAN_FLAG_VNI, 0, 0, 0];
    payload.extend_from_slice(&(vni << 8).to_be_bytes());
    payload.extend_from_slice(inner);
    let dgram = udp(src, dst, &payload, false);
    ethernet(
        dst_mac,
        src_mac,
        ETH_P_IP,
        &ipv4(*src.ip(), *dst.ip(), PROTO_UDP, &dgram),
    )
}

/// Splits a VXLAN frame: its outer headers as parsed, the VNI, and the inner Ethernet frame.
pub fn vxlan_inner(frame: &[u8]) -> Result<(Parsed, u32, Vec<u8>), PacketError> {
    let outer = parse(frame)?;
    let (l4, end) = l4_bounds(frame)?;
    if outer.proto != PROTO_UDP || end < l4 + 8 + VXLAN_HLEN + ETH_HLEN {
        return Err(PacketError::Truncated("VXLAN header"));
    }
    let vx = &frame[l4 + 8..l4 + 8 + VXLAN_HLEN];
    if vx[0] & VXLAN_FLAG_VNI == 0 {
        return Err(PacketError::Truncated("VXLAN VNI flag"));
    }
    let vni = u32::from_be_bytes([0, vx[4], vx[5], vx[6]]);
    Ok((outer, vni, frame[l4 + 8 + VXLAN_HLEN..end].to_vec()))
}

/// The frame a pod would receive: a VXLAN packet's inner frame (UDP to the overlay's port), any
/// other frame as it is.
pub fn decapsulated(frame: &[u8]) -> Vec<u8> {
    match vxlan_inner(frame) {
        Ok((outer, _, inner)) if outer.dport == super::VXLAN_PORT => inner,
        _ => frame.to_vec(),
    }
}

/// The fields of a frame that tests look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub eth_dst: Mac,
    pub eth_src: Mac,
    pub ethertype: u16,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub ttl: u8,
    /// TCP/UDP source port; ICMP echo: the echo id.
    pub sport: u16,
    /// TCP/UDP destination port; ICMP echo: the echo id.
    pub dport: u16,
    pub icmp_type: Option<u8>,
}

fn mac_at(frame: &[u8], at: usize) -> Mac {
    let mut mac = [0; 6];
    mac.copy_from_slice(&frame[at..at + 6]);
    mac
}

fn l4_bounds(frame: &[u8]) -> Result<(usize, usize), PacketError> {
    if frame.len() < ETH_HLEN + IP_HLEN {
        return Err(PacketError::Truncated("IPv4 header"));
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype != ETH_P_IP {
        return Err(PacketError::NotIpv4(ethertype));
    }
    let ihl = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([
        frame[ETH_HLEN + 2],
        frame[ETH_HLEN + 3],
    ]));
    if ihl < IP_HLEN || total < ihl || frame.len() < ETH_HLEN + total {
        return Err(PacketError::Truncated("IPv4 total length"));
    }
    Ok((ETH_HLEN + ihl, ETH_HLEN + total))
}

/// Parses an Ethernet + IPv4 frame.
pub fn parse(frame: &[u8]) -> Result<Parsed, PacketError> {
    let (l4, end) = l4_bounds(frame)?;
    let ip = &frame[ETH_HLEN..];
    let proto = ip[9];
    let l4_data = &frame[l4..end];
    let (sport, dport, icmp_type) = match proto {
        PROTO_TCP | PROTO_UDP if l4_data.len() >= 4 => (
            u16::from_be_bytes([l4_data[0], l4_data[1]]),
            u16::from_be_bytes([l4_data[2], l4_data[3]]),
            None,
        ),
        PROTO_ICMP if l4_data.len() >= 8 => {
            let id = u16::from_be_bytes([l4_data[4], l4_data[5]]);
            (id, id, Some(l4_data[0]))
        }
        PROTO_TCP | PROTO_UDP | PROTO_ICMP => return Err(PacketError::Truncated("L4 header")),
        _ => (0, 0, None),
    };
    Ok(Parsed {
        eth_dst: mac_at(frame, 0),
        eth_src: mac_at(frame, 6),
        ethertype: ETH_P_IP,
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        proto,
        ttl: ip[8],
        sport,
        dport,
        icmp_type,
    })
}

/// Checks the IPv4 header checksum and the TCP/UDP/ICMP checksum (UDP 0 = none is accepted).
pub fn verify_checksums(frame: &[u8]) -> Result<(), PacketError> {
    let (l4, end) = l4_bounds(frame)?;
    if checksum(&frame[ETH_HLEN..l4]) != 0 {
        return Err(PacketError::BadIpChecksum);
    }
    let ip = &frame[ETH_HLEN..];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let data = &frame[l4..end];
    let l4_sum = |proto| fold(sum16(pseudo_header_sum(src, dst, proto, data.len()), data));
    match ip[9] {
        PROTO_TCP if l4_sum(PROTO_TCP) != 0 => Err(PacketError::BadL4Checksum("TCP")),
        PROTO_UDP if data.len() < 8 => Err(PacketError::Truncated("UDP header")),
        // A stored UDP checksum of 0 means "none".
        PROTO_UDP if data[6..8] != [0, 0] && l4_sum(PROTO_UDP) != 0 => {
            Err(PacketError::BadL4Checksum("UDP"))
        }
        PROTO_ICMP if checksum(data) != 0 => Err(PacketError::BadL4Checksum("ICMP")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Mac = [2, 0, 0, 0, 0, 1];
    const B: Mac = [2, 0, 0, 0, 0, 2];

    fn sa(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn rfc1071_example() {
        // The worked example of RFC 1071 section 3: sum 0xddf2, checksum its complement.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn built_frames_have_valid_checksums_and_parse_back() {
        let tcp = tcp_frame(A, B, sa("10.1.0.5:40000"), sa("203.0.113.10:80"), b"hello");
        verify_checksums(&tcp).unwrap();
        let p = parse(&tcp).unwrap();
        assert_eq!((p.eth_src, p.eth_dst, p.proto), (A, B, PROTO_TCP));
        assert_eq!((p.sport, p.dport), (40000, 80));
        assert_eq!(p.src, Ipv4Addr::new(10, 1, 0, 5));

        let udp = udp_frame(A, B, sa("10.1.0.5:5353"), sa("203.0.113.10:53"), b"q", true);
        verify_checksums(&udp).unwrap();
        let udp0 = udp_frame(
            A,
            B,
            sa("10.1.0.5:5353"),
            sa("203.0.113.10:53"),
            b"q",
            false,
        );
        verify_checksums(&udp0).unwrap();

        let ping = icmp_echo_frame(
            A,
            B,
            Ipv4Addr::new(10, 1, 0, 5),
            Ipv4Addr::new(8, 8, 8, 8),
            true,
            77,
        );
        verify_checksums(&ping).unwrap();
        assert_eq!(parse(&ping).unwrap().icmp_type, Some(8));
        assert_eq!(parse(&ping).unwrap().sport, 77);
    }

    #[test]
    fn fragments_carry_the_datagram_in_8_byte_units_and_reassemble_in_any_order() {
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let whole = udp_frame(
            A,
            B,
            sa("10.1.0.5:33000"),
            sa("10.0.0.20:53"),
            &payload,
            true,
        );
        let frags = fragment(&whole, 0x1234, 1405);
        assert_eq!(frags.len(), 3, "3008 bytes of UDP in 1400-byte pieces");
        let info: Vec<_> = frags.iter().map(|f| fragment_info(f).unwrap()).collect();
        assert_eq!(
            info,
            [
                (0x1234, true, 0),
                (0x1234, true, 1400),
                (0x1234, false, 2800)
            ]
        );
        for f in &frags {
            assert_eq!(checksum(&f[ETH_HLEN..ETH_HLEN + IP_HLEN]), 0);
        }
        let mut shuffled = frags.clone();
        shuffled.rotate_left(1);
        let joined = reassemble(&shuffled).unwrap();
        verify_checksums(&joined).unwrap();
        assert_eq!(joined[ETH_HLEN + IP_HLEN..], whole[ETH_HLEN + IP_HLEN..]);
        assert_eq!(parse(&joined).unwrap(), parse(&whole).unwrap());
        assert_eq!(
            reassemble(&frags[..2]),
            Err(PacketError::Truncated("a fragment is missing"))
        );
        assert_eq!(
            reassemble(&[frags[0].clone(), frags[2].clone()]),
            Err(PacketError::Truncated("a fragment is missing"))
        );
    }

    #[test]
    fn vxlan_frames_carry_the_inner_frame_and_vni() {
        let inner = udp_frame(A, B, sa("10.1.0.5:5000"), sa("10.1.1.7:53"), b"q", true);
        let outer = vxlan_frame(
            A,
            B,
            sa("10.224.0.10:40000"),
            sa("10.224.0.11:8472"),
            42,
            &inner,
        );
        verify_checksums(&outer).unwrap();
        let (p, vni, got) = vxlan_inner(&outer).unwrap();
        assert_eq!((p.dport, vni), (8472, 42));
        assert_eq!(got, inner);
        assert!(
            vxlan_inner(&inner).is_err(),
            "a plain UDP datagram is no VXLAN packet"
        );
    }

    #[test]
    fn corrupted_frames_fail_verification() {
        let mut tcp = tcp_frame(A, B, sa("10.1.0.5:40000"), sa("203.0.113.10:80"), b"hello");
        let last = tcp.len() - 1;
        tcp[last] ^= 0xff;
        assert_eq!(
            verify_checksums(&tcp),
            Err(PacketError::BadL4Checksum("TCP"))
        );
        let mut ip = udp_frame(A, B, sa("10.1.0.5:1"), sa("10.1.0.6:2"), b"x", true);
        ip[ETH_HLEN + 8] = 3; // TTL changed without fixing the header checksum
        assert_eq!(verify_checksums(&ip), Err(PacketError::BadIpChecksum));
        let arp = arp_frame(
            1,
            A,
            Ipv4Addr::new(10, 1, 0, 5),
            [0; 6],
            Ipv4Addr::new(169, 254, 1, 1),
        );
        assert_eq!(parse(&arp), Err(PacketError::NotIpv4(ETH_P_ARP)));
        assert_eq!(arp.len(), ETH_HLEN + 28);
        assert!(parse(&ipv6_frame(A, B)).is_err());
    }
}

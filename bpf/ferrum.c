// SPDX-License-Identifier: GPL-2.0
/* Ferrum datapath: tc (tcx) programs for pod veths, the VXLAN overlay device and the uplink.
 * Overlay mode, IPv4 only. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <stddef.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "ferrum.h"

char LICENSE[] SEC("license") = "GPL";

_Static_assert(sizeof(struct ferrum_config) == FERRUM_CONFIG_SIZE, "ferrum_config layout");
_Static_assert(sizeof(struct ferrum_endpoint) == FERRUM_ENDPOINT_SIZE, "ferrum_endpoint layout");
_Static_assert(sizeof(struct ferrum_ipcache_value) == FERRUM_IPCACHE_VALUE_SIZE, "ipcache layout");
_Static_assert(sizeof(struct ferrum_nat_key) == FERRUM_NAT_KEY_SIZE, "nat key layout");
_Static_assert(sizeof(struct ferrum_nat_value) == FERRUM_NAT_VALUE_SIZE, "nat value layout");
_Static_assert(sizeof(struct ferrum_frag_key) == FERRUM_FRAG_KEY_SIZE, "frag key layout");
_Static_assert(sizeof(struct ferrum_frag_value) == FERRUM_FRAG_VALUE_SIZE, "frag value layout");
_Static_assert(sizeof(struct ferrum_event) == FERRUM_EVENT_SIZE, "event layout");
_Static_assert(sizeof(struct ferrum_flow_key) == FERRUM_FLOW_KEY_SIZE, "flow key layout");
_Static_assert(sizeof(struct ferrum_flow_slot) == FERRUM_FLOW_SLOT_SIZE, "flow slot layout");
_Static_assert(sizeof(struct ferrum_lb_key) == FERRUM_LB_KEY_SIZE, "lb key layout");
_Static_assert(sizeof(struct ferrum_lb_service) == FERRUM_LB_SERVICE_SIZE, "lb service layout");
_Static_assert(sizeof(struct ferrum_lb_backend_key) == FERRUM_LB_BACKEND_KEY_SIZE, "lb backend key");
_Static_assert(sizeof(struct ferrum_lb_backend) == FERRUM_LB_BACKEND_SIZE, "lb backend layout");
_Static_assert(sizeof(struct ferrum_lb_ct) == FERRUM_LB_CT_SIZE, "lb ct layout");
_Static_assert(sizeof(struct ferrum_lb_rev) == FERRUM_LB_REV_SIZE, "lb rev layout");
_Static_assert(sizeof(struct ferrum_pol_cidr_key) == FERRUM_POL_CIDR_KEY_SIZE, "cidr key layout");
_Static_assert(sizeof(struct ferrum_policy_key) == FERRUM_POLICY_KEY_SIZE, "policy key layout");
_Static_assert(sizeof(struct ferrum_pol_ct) == FERRUM_POL_CT_SIZE, "policy ct layout");

#define NAT_PORT_TRIES 32
#define TUNNEL_TTL 64
#define ARP_HLEN 28
#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SADDR_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DADDR_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ferrum_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct ferrum_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ferrum_ipcache_key);
	__type(value, struct ferrum_ipcache_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ferrum_nat_key);
	__type(value, struct ferrum_nat_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_nat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ferrum_nat_key);
	__type(value, struct ferrum_nat_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_nat_rev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1024 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_events SEC(".maps");

/* Events the full ring could not take (per CPU; the agent sums them). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_events_lost SEC(".maps");

/* Last trace event time per (flow, observation point) for non-TCP flows: per CPU and direct
 * mapped, so the check is an array access without locks or hashing in the map. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FERRUM_FLOW_AGG_SLOTS);
	__type(key, __u32);
	__type(value, struct ferrum_flow_slot);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_flow_agg SEC(".maps");

/* linux/icmp.h drags in libc headers that do not exist for the BPF target. */
#define ICMP_ECHOREPLY 0
#define ICMP_ECHO 8
/* ICMP errors quote the packet they are about (RFC 792): unreachable (incl. fragmentation
 * needed), time exceeded, parameter problem. */
#define ICMP_ERR_UNREACH 3
#define ICMP_ERR_TIME_EXCEEDED 11
#define ICMP_ERR_PARAMETER 12
struct icmp_echo_hdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 id;
	__be16 sequence;
};

struct arp_eth_ipv4 {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[ETH_ALEN];
	__u8 sip[4];
	__u8 tha[ETH_ALEN];
	__u8 tip[4];
} __attribute__((packed));

/* What the programs need to know about an IPv4 packet. */
struct flow {
	__u32 saddr;
	__u32 daddr;
	__u16 sport; /* TCP/UDP port, ICMP echo id (network order) */
	__u16 dport;
	__u8 proto;
	__u8 has_ports; /* TCP, UDP or ICMP echo/reply with an identifier we can translate */
	__u8 icmp_type;
	__u8 tcp_flags;
	__u32 l4_off;
	/* Context for events: the Service frontend and the policy rule that let it through. */
	__u32 svc_id;
	__u32 rule_id;
	__u8 lb_rev; /* lb_rev_nat translated this reply */
	__u8 reply; /* the policy stage found it to be a reply */
	/* A non-first IPv4 fragment: no transport header here, so translations rewrite the IP
	 * header only; its ports (if any) are the first fragment's, from ferrum_frags. */
	__u8 frag_later;
};

static __always_inline struct ferrum_config *config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&ferrum_config, &zero);
}

static __always_inline int in_prefix(__u32 addr, __u32 net, __u32 prefix_len)
{
	__u32 mask;
	if (prefix_len == 0)
		return 1;
	if (prefix_len > 32)
		return 0;
	mask = bpf_htonl(0xffffffffU << (32 - prefix_len));
	return (addr & mask) == (net & mask);
}

/* skb->ifindex as one load at a constant offset from the context: clang would otherwise keep a
 * pointer into the context around (&skb->ifindex), which the verifier refuses to dereference. */
static __always_inline __u32 skb_ifindex(struct __sk_buff *skb)
{
	__u32 v;
	asm volatile("%0 = *(u32 *)(%1 + %2)"
		     : "=r"(v)
		     : "r"(skb), "i"(offsetof(struct __sk_buff, ifindex)));
	return v;
}

static __always_inline void emit(struct __sk_buff *skb, __u8 kind, __u8 reason,
				 const struct flow *f, __u32 tunnel, __u32 nat_addr, __u16 nat_port)
{
	struct ferrum_event ev = {};
	ev.ts_ns = bpf_ktime_get_ns();
	ev.kind = kind;
	ev.reason = reason;
	ev.ifindex = skb_ifindex(skb);
	if (f) {
		ev.proto = f->proto;
		ev.saddr = f->saddr;
		ev.daddr = f->daddr;
		ev.sport = f->sport;
		ev.dport = f->dport;
		ev.tcp_flags = f->tcp_flags;
		ev.icmp_type = f->icmp_type;
		ev.service_id = f->svc_id;
		ev.rule_id = f->rule_id;
		if (f->reply)
			ev.ev_flags |= FERRUM_EVF_REPLY;
	}
	ev.tunnel_endpoint = tunnel;
	ev.nat_addr = nat_addr;
	ev.nat_port = nat_port;
	if (reason == FERRUM_TRACE_REV_SNAT)
		ev.ev_flags |= FERRUM_EVF_REPLY;
	/* A full ring loses the event, never the packet; the loss is counted. */
	if (bpf_ringbuf_output(&ferrum_events, &ev, sizeof(ev), 0) < 0) {
		__u32 zero = 0;
		__u64 *lost = bpf_map_lookup_elem(&ferrum_events_lost, &zero);
		if (lost)
			*lost += 1;
	}
}

static __always_inline int drop(struct __sk_buff *skb, __u8 reason, const struct flow *f)
{
	emit(skb, FERRUM_EVENT_DROP, reason, f, 0, 0, 0);
	return TC_ACT_SHOT;
}

/* A drop by the policy stage: the event carries the deciding rule. */
static __always_inline int drop_rule(struct __sk_buff *skb, __u8 reason, struct flow *f, __u32 rule)
{
	f->rule_id = rule;
	return drop(skb, reason, f);
}

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

static __always_inline __u32 mix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* Whether a forwarded packet starts a flow record: TCP connection starts and ends cost no map
 * access; other protocols emit once per flow, point and CPU per FERRUM_FLOW_AGG_NS. */
static __always_inline int flow_event_due(const struct ferrum_config *cfg, __u8 point,
					  const struct flow *f)
{
	struct ferrum_flow_key key = {};
	struct ferrum_flow_slot *slot;
	__u64 now, *a, *b;
	__u32 idx;

	if (cfg->flags & FERRUM_FLAG_TRACE_ALL)
		return 1;
	if (f->proto == IPPROTO_TCP)
		return (f->tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST)) != 0;
	key.saddr = f->saddr;
	key.daddr = f->daddr;
	key.sport = f->sport;
	key.dport = f->dport;
	key.proto = f->proto;
	key.point = point;
	idx = mix32(key.saddr ^ mix32(key.daddr ^ mix32(((__u32)key.sport << 16 | key.dport) ^
							  ((__u32)key.proto << 8 | point)))) &
	      (FERRUM_FLOW_AGG_SLOTS - 1);
	slot = bpf_map_lookup_elem(&ferrum_flow_agg, &idx);
	if (!slot)
		return 1;
	now = bpf_ktime_get_coarse_ns();
	a = (__u64 *)&key;
	b = (__u64 *)&slot->key;
	if (a[0] == b[0] && a[1] == b[1] && now - slot->last_ns < FERRUM_FLOW_AGG_NS)
		return 0;
	slot->key = key;
	slot->last_ns = now;
	return 1;
}

static __always_inline void trace(struct __sk_buff *skb, const struct ferrum_config *cfg, __u8 point,
				  const struct flow *f, __u32 tunnel, __u32 nat_addr, __u16 nat_port)
{
	if (cfg && (cfg->flags & FERRUM_FLAG_TRACE) && flow_event_due(cfg, point, f))
		emit(skb, FERRUM_EVENT_TRACE, point, f, tunnel, nat_addr, nat_port);
}

/* The first fragment's parse, for the later fragments of its datagram. LRU: an entry outlives
 * its datagram, and a lost first fragment leaves nothing to clean up. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct ferrum_frag_key);
	__type(value, struct ferrum_frag_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_frags SEC(".maps");

#define IP_FRAG_MF 0x2000
#define IP_FRAG_OFFSET 0x1fff

/* Parses Ethernet + IPv4 (+ ports). Returns 0 on success, -1 when not IPv4, -2 malformed.
 * A later fragment gets its first fragment's ports when that one passed this node; otherwise
 * it has none (policy then judges it without ports, and nothing translates it). */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct flow *f)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN;
	struct ferrum_frag_key fkey = {};
	struct ferrum_frag_value *first, fval = {};
	__u16 frag;
	__u32 ihl;

	if ((void *)(eth + 1) > data_end)
		return -2;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return -1;
	if ((void *)(ip + 1) > data_end)
		return -2;
	ihl = ip->ihl * 4;
	if (ip->version != 4 || ihl < sizeof(struct iphdr))
		return -2;
	f->saddr = ip->saddr;
	f->daddr = ip->daddr;
	f->proto = ip->protocol;
	f->sport = 0;
	f->dport = 0;
	f->has_ports = 0;
	f->icmp_type = 0;
	f->tcp_flags = 0;
	f->l4_off = ETH_HLEN + ihl;
	f->frag_later = 0;
	frag = ip->frag_off & bpf_htons(IP_FRAG_MF | IP_FRAG_OFFSET);
	if (frag) {
		fkey.saddr = ip->saddr;
		fkey.daddr = ip->daddr;
		fkey.id = ip->id;
		fkey.proto = ip->protocol;
	}
	if (frag & bpf_htons(IP_FRAG_OFFSET)) {
		f->frag_later = 1;
		first = bpf_map_lookup_elem(&ferrum_frags, &fkey);
		if (first) {
			f->sport = first->sport;
			f->dport = first->dport;
			f->has_ports = first->has_ports;
			f->icmp_type = first->icmp_type;
		}
		return 0;
	}
	if (f->proto == IPPROTO_TCP) {
		__u8 tcp[14]; /* ports, seq, ack, data offset, flags */
		if (bpf_skb_load_bytes(skb, f->l4_off, tcp, sizeof(tcp)) < 0)
			return -2;
		__builtin_memcpy(&f->sport, &tcp[0], 2);
		__builtin_memcpy(&f->dport, &tcp[2], 2);
		f->tcp_flags = tcp[13];
		f->has_ports = 1;
	} else if (f->proto == IPPROTO_UDP) {
		__u16 ports[2];
		if (bpf_skb_load_bytes(skb, f->l4_off, ports, sizeof(ports)) < 0)
			return -2;
		f->sport = ports[0];
		f->dport = ports[1];
		f->has_ports = 1;
	} else if (f->proto == IPPROTO_SCTP) {
		/* Policy matches SCTP ports; nothing translates SCTP (its CRC32c checksum would
		 * have to be recomputed), so has_ports stays 0. */
		__u16 ports[2];
		if (bpf_skb_load_bytes(skb, f->l4_off, ports, sizeof(ports)) < 0)
			return -2;
		f->sport = ports[0];
		f->dport = ports[1];
	} else if (f->proto == IPPROTO_ICMP) {
		struct icmp_echo_hdr icmp;
		if (bpf_skb_load_bytes(skb, f->l4_off, &icmp, sizeof(icmp)) < 0)
			return -2;
		f->icmp_type = icmp.type;
		if (icmp.type == ICMP_ECHO || icmp.type == ICMP_ECHOREPLY) {
			f->has_ports = 1;
			/* The echo id plays the port on the host that sent the request. */
			if (icmp.type == ICMP_ECHO)
				f->sport = icmp.id;
			else
				f->dport = icmp.id;
		}
	}
	if (frag) {
		/* The first of several fragments. */
		fval.sport = f->sport;
		fval.dport = f->dport;
		fval.has_ports = f->has_ports;
		fval.icmp_type = f->icmp_type;
		bpf_map_update_elem(&ferrum_frags, &fkey, &fval, BPF_ANY);
	}
	return 0;
}

/* Delivers to a local pod with the MACs it would see if the host veth had routed the packet.
 * From an ingress hook the packet goes straight into the pod's netns (bpf_redirect_peer);
 * from an egress hook, where that is not allowed, out of the pod's host veth. */
static __always_inline int deliver_to_endpoint(struct __sk_buff *skb,
					       const struct ferrum_config *cfg,
					       const struct ferrum_endpoint *ep,
					       const struct flow *f, int at_ingress)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return drop(skb, FERRUM_DROP_MALFORMED, f);
	__builtin_memcpy(eth->h_dest, ep->pod_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, ep->host_mac, ETH_ALEN);
	trace(skb, cfg, FERRUM_TRACE_TO_ENDPOINT, f, 0, 0, 0);
	return at_ingress ? bpf_redirect_peer(ep->ifindex, 0) : bpf_redirect(ep->ifindex, 0);
}

static __always_inline int to_endpoint(struct __sk_buff *skb, const struct ferrum_config *cfg,
				       const struct ferrum_endpoint *ep, const struct flow *f)
{
	return deliver_to_endpoint(skb, cfg, ep, f, 1);
}

static __always_inline int set_tunnel(struct __sk_buff *skb, const struct ferrum_config *cfg,
				      __u32 tunnel_endpoint)
{
	struct bpf_tunnel_key key = {};
	key.remote_ipv4 = bpf_ntohl(tunnel_endpoint);
	key.tunnel_id = cfg->vni;
	key.tunnel_ttl = TUNNEL_TTL;
	return bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX);
}

static __always_inline int macs_equal(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] &&
	       a[5] == b[5];
}

static __always_inline int from_pod_arp(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct arp_eth_ipv4 *arp = data + ETH_HLEN;
	struct ferrum_endpoint *ep;
	struct flow f = {};
	__u32 sip;

	if ((void *)(arp + 1) > data_end)
		return drop(skb, FERRUM_DROP_MALFORMED, NULL);
	if (arp->ptype != bpf_htons(ETH_P_IP) || arp->hlen != ETH_ALEN || arp->plen != 4)
		return drop(skb, FERRUM_DROP_UNSUPPORTED_L3, NULL);
	__builtin_memcpy(&sip, arp->sip, 4);
	__builtin_memcpy(&f.daddr, arp->tip, 4);
	f.saddr = sip;
	ep = bpf_map_lookup_elem(&ferrum_endpoints, &sip);
	if (!ep || ep->ifindex != skb->ifindex)
		return drop(skb, FERRUM_DROP_SPOOFED_IP, &f);
	if (!macs_equal(arp->sha, ep->pod_mac) || !macs_equal(eth->h_source, ep->pod_mac))
		return drop(skb, FERRUM_DROP_SPOOFED_MAC, &f);
	return TC_ACT_OK;
}

/* ---- NetworkPolicy ---------------------------------------------------------------------- */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct ferrum_pol_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_pol_endpoints SEC(".maps");

/* Every entry is one address (pods, nodes): a hash lookup costs the same at any size. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 524288);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_pol_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ferrum_pol_cidr_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_pol_cidr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1048576);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ferrum_policy_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct ferrum_nat_key);
	__type(value, struct ferrum_pol_ct);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_pol_ct SEC(".maps");

/* The policy map's entries for a whole port (96 bits), a whole protocol (80: port 0) or every
 * protocol (72: protocol and port 0) live in a hash, so that a lookup costs the same however
 * many identities and rules there are; port ranges stay in the LPM above. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1048576);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ferrum_policy_data);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_policy_exact SEC(".maps");

#define POLICY_ALLOW 0
#define POLICY_DENY 1

/* The rule allowing `peer` (the longest match, as one LPM over all entries would give). */
static __always_inline __u32 *policy_lookup(struct ferrum_policy_key *key, __u32 peer)
{
	struct ferrum_policy_data *data = (void *)key + sizeof(key->prefixlen);
	__u32 be = bpf_htonl(peer), *v;
	__u16 port = key->port;
	__u8 proto = key->proto;

	__builtin_memcpy(key->peer, &be, 4);
	v = bpf_map_lookup_elem(&ferrum_policy_exact, data);
	if (v)
		return v;
	v = bpf_map_lookup_elem(&ferrum_policy, key);
	if (v)
		return v;
	key->port = 0;
	v = bpf_map_lookup_elem(&ferrum_policy_exact, data);
	if (!v) {
		key->proto = 0;
		v = bpf_map_lookup_elem(&ferrum_policy_exact, data);
		key->proto = proto;
	}
	key->port = port;
	return v;
}

/* One direction of one isolated endpoint: does some rule allow this peer, protocol and port?
 * A constant number of lookups whatever the number of pods, identities or policies: the peer's
 * identity, the "any peer" wildcard, then the peer address's ipBlock class. */
static __always_inline int policy_allows(__u32 endpoint, __u8 direction, __u32 peer_addr,
					 __u8 proto, __u16 port, __u32 *rule)
{
	struct ferrum_pol_cidr_key ckey = {};
	struct ferrum_policy_key key = {};
	__u32 identity = FERRUM_ID_WORLD, *v;

	v = bpf_map_lookup_elem(&ferrum_pol_ipcache, &peer_addr);
	if (v)
		identity = *v;
	/* The endpoint's own node always gets in (kubelet health probes). */
	if (direction == FERRUM_POLICY_INGRESS && identity == FERRUM_ID_HOST) {
		*rule = 0;
		return 1;
	}
	key.prefixlen = FERRUM_POLICY_KEY_BITS;
	key.endpoint = endpoint;
	key.direction = direction;
	key.proto = proto;
	key.port = port;
	v = policy_lookup(&key, identity);
	if (!v)
		v = policy_lookup(&key, FERRUM_ID_ANY);
	if (!v) {
		ckey.prefixlen = 72;
		ckey.endpoint = endpoint;
		ckey.direction = direction;
		__builtin_memcpy(ckey.addr, &peer_addr, 4);
		v = bpf_map_lookup_elem(&ferrum_pol_cidr, &ckey);
		if (v && *v)
			v = policy_lookup(&key, *v);
		else
			v = NULL;
	}
	if (!v)
		return 0;
	*rule = *v;
	return 1;
}

/* The verdict for a connection from `src` (the initiator, as policy sees it) to `dst`:dport:
 * the initiator's egress if it is an endpoint of this node, then the responder's ingress if
 * it is. Returns POLICY_ALLOW with the deciding rule (the ingress one when both decide), or
 * POLICY_DENY with the isolating policy's rule and the drop reason. */
static __always_inline int policy_decide_inline(__u32 src, __u32 dst, __u8 proto, __u16 dport,
						__u32 *rule, __u8 *reason)
{
	struct ferrum_pol_endpoint *ep;
	__u32 r = 0;

	*rule = 0;
	ep = bpf_map_lookup_elem(&ferrum_pol_endpoints, &src);
	if (ep && ep->egress_deny_rule) {
		__u32 deny = ep->egress_deny_rule;
		if (!policy_allows(src, FERRUM_POLICY_EGRESS, dst, proto, dport, &r)) {
			*rule = deny;
			*reason = FERRUM_DROP_POLICY_EGRESS;
			return POLICY_DENY;
		}
		*rule = r;
	}
	ep = bpf_map_lookup_elem(&ferrum_pol_endpoints, &dst);
	if (ep && ep->ingress_deny_rule) {
		__u32 deny = ep->ingress_deny_rule;
		if (!policy_allows(dst, FERRUM_POLICY_INGRESS, src, proto, dport, &r)) {
			*rule = deny;
			*reason = FERRUM_DROP_POLICY_INGRESS;
			return POLICY_DENY;
		}
		if (r)
			*rule = r;
	}
	return POLICY_ALLOW;
}

/* Global, so the verifier checks the lookups once rather than at every call site. Returns 0
 * (allowed) or the drop reason; *rule as policy_decide_inline sets it. */
__attribute__((noinline)) int ferrum_policy_decide(__u32 src, __u32 dst, __u32 proto,
						   __u32 dport, __u32 *rule)
{
	__u32 r = 0;
	__u8 reason = 0;
	int verdict = policy_decide_inline(src, dst, proto, dport, &r, &reason);

	if (rule)
		*rule = r;
	return verdict == POLICY_DENY ? reason : 0;
}

static __always_inline int policy_decide(__u32 src, __u32 dst, __u8 proto, __u16 dport,
					 __u32 *rule, __u8 *reason)
{
	int r = ferrum_policy_decide(src, dst, proto, dport, rule);

	*reason = r;
	return r ? POLICY_DENY : POLICY_ALLOW;
}

/* The conntrack key of a packet: both directions of a connection give the same key. Returns 1
 * when the packet's source is the key's a side. */
static __always_inline int tuple_ct_key(__u32 saddr, __u32 daddr, __u16 sport, __u16 dport,
					__u8 proto, struct ferrum_nat_key *k)
{
	int src_is_a = saddr < daddr || (saddr == daddr && sport <= dport);

	k->proto = proto;
	if (src_is_a) {
		k->addr_a = saddr;
		k->port_a = sport;
		k->addr_b = daddr;
		k->port_b = dport;
	} else {
		k->addr_a = daddr;
		k->port_a = dport;
		k->addr_b = saddr;
		k->port_b = sport;
	}
	return src_is_a;
}

static __always_inline int pol_ct_key(const struct flow *f, struct ferrum_nat_key *k)
{
	return tuple_ct_key(f->saddr, f->daddr, f->sport, f->dport, f->proto, k);
}

/* Entries stamped by the precise clock (older programs) may be a tick ahead of the coarse one. */
static __always_inline __u64 pol_ct_age(__u64 now, const struct ferrum_pol_ct *ct)
{
	return now > ct->last_ns ? now - ct->last_ns : 0;
}

static __always_inline __u64 pol_ct_lifetime(const struct ferrum_pol_ct *ct, __u8 proto)
{
	if (ct->flags & FERRUM_POL_CT_CLOSING)
		return FERRUM_POL_CT_CLOSING_NS;
	return proto == IPPROTO_TCP ? FERRUM_POL_CT_TCP_NS : FERRUM_POL_CT_OTHER_NS;
}

/* The packet an ICMP error quotes: its IP header, where its transport header starts, and its
 * ports (TCP, UDP, SCTP; an ICMP echo request: the id as the source port, as the echo's own
 * flow has it; other protocols: none). */
struct icmp_quote {
	struct iphdr ip;
	__u32 off; /* of the quoted IP header */
	__u32 l4;  /* of the quoted transport header */
	__u16 sport;
	__u16 dport;
};

static __always_inline int is_icmp_error(const struct flow *f)
{
	return f->proto == IPPROTO_ICMP && !f->frag_later &&
	       (f->icmp_type == ICMP_ERR_UNREACH || f->icmp_type == ICMP_ERR_TIME_EXCEEDED ||
		f->icmp_type == ICMP_ERR_PARAMETER);
}

/* 0 when the error quotes an IPv4 packet whose ports (if it has any) are readable; an ICMP
 * message other than an echo request is never quoted by an error about it. */
static __always_inline int load_icmp_quote(struct __sk_buff *skb, const struct flow *f,
					   struct icmp_quote *q)
{
	q->off = f->l4_off + sizeof(struct icmp_echo_hdr);
	if (bpf_skb_load_bytes(skb, q->off, &q->ip, sizeof(q->ip)) < 0 || q->ip.version != 4 ||
	    q->ip.ihl < 5)
		return -1;
	q->l4 = q->off + q->ip.ihl * 4;
	q->sport = 0;
	q->dport = 0;
	if (q->ip.protocol == IPPROTO_TCP || q->ip.protocol == IPPROTO_UDP ||
	    q->ip.protocol == IPPROTO_SCTP) {
		__u16 ports[2];

		if (bpf_skb_load_bytes(skb, q->l4, ports, sizeof(ports)) < 0)
			return -1;
		q->sport = ports[0];
		q->dport = ports[1];
	} else if (q->ip.protocol == IPPROTO_ICMP) {
		struct icmp_echo_hdr echo;

		if (bpf_skb_load_bytes(skb, q->l4, &echo, sizeof(echo)) < 0 || echo.type != ICMP_ECHO)
			return -1;
		q->sport = echo.id;
	}
	return 0;
}

/* An ICMP error quoting a packet of a tracked, allowed connection belongs to it: fills the
 * connection's rule and returns 1. */
static __always_inline int pol_icmp_related(struct __sk_buff *skb, const struct ferrum_config *cfg,
					    struct flow *f, __u64 now)
{
	struct ferrum_nat_key qkey = {};
	struct ferrum_pol_ct *qct;
	struct icmp_quote q;

	if (!is_icmp_error(f) || load_icmp_quote(skb, f, &q) < 0)
		return 0;
	tuple_ct_key(q.ip.saddr, q.ip.daddr, q.sport, q.dport, q.ip.protocol, &qkey);
	qct = bpf_map_lookup_elem(&ferrum_pol_ct, &qkey);
	if (!qct || (qct->flags & FERRUM_POL_CT_DENIED) || qct->gen != cfg->policy_gen ||
	    pol_ct_age(now, qct) >= pol_ct_lifetime(qct, q.ip.protocol))
		return 0;
	f->reply = 1;
	f->rule_id = qct->rule_id;
	return 1;
}



/* The policy stage, at the one place on this node where a packet is delivered to (or leaves)
 * a local pod. A connection is judged on its first packet; replies and later packets follow
 * the conntrack entry. A policy change bumps the generation: a tracked connection is judged
 * again (in its original direction) on its next packet, and one the new policy denies is cut
 * in both directions. `initiator` is the source address policy judges a new connection by
 * (the client before hairpin or masquerade SNAT). Returns POLICY_ALLOW or POLICY_DENY (the
 * drop event has been emitted). */
static __always_inline int policy_check_inline(struct __sk_buff *skb,
					       const struct ferrum_config *cfg, struct flow *f,
					       __u32 initiator)
{
	struct ferrum_nat_key key = {};
	struct ferrum_pol_ct *ct, nct = {};
	/* Coarse (tick resolution) is plenty for lifetimes of seconds, and unlike the precise
	 * clock it costs no clock-source read on every packet. */
	__u64 now = bpf_ktime_get_coarse_ns();
	__u32 rule = 0, init_addr, responder;
	__u16 rport;
	__u8 reason = 0;
	int src_is_a = pol_ct_key(f, &key);
	int syn = f->proto == IPPROTO_TCP &&
		  (f->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;

	if (pol_icmp_related(skb, cfg, f, now))
		return POLICY_ALLOW;
	ct = bpf_map_lookup_elem(&ferrum_pol_ct, &key);
	if (ct && pol_ct_age(now, ct) < pol_ct_lifetime(ct, f->proto)) {
		int from_initiator = ((ct->flags & FERRUM_POL_CT_A_INITIATED) != 0) == src_is_a;

		f->reply = !from_initiator;
		if (ct->gen != cfg->policy_gen || ((ct->flags & FERRUM_POL_CT_DENIED) && syn)) {
			/* Judge the connection again as its first packet was. */
			init_addr = ct->initiator;
			responder = from_initiator ? f->daddr : f->saddr;
			rport = from_initiator ? f->dport : f->sport;
			if (policy_decide(init_addr, responder, f->proto, rport, &rule, &reason) ==
			    POLICY_DENY) {
				ct->flags |= FERRUM_POL_CT_DENIED;
				ct->reason = reason;
			} else {
				ct->flags &= ~FERRUM_POL_CT_DENIED;
			}
			ct->rule_id = rule;
			ct->gen = cfg->policy_gen;
		}
		if (ct->flags & FERRUM_POL_CT_DENIED) {
			drop_rule(skb, ct->reason, f, ct->rule_id);
			return POLICY_DENY;
		}
		if (f->tcp_flags & (TCP_FIN | TCP_RST))
			ct->flags |= FERRUM_POL_CT_CLOSING;
		else if (syn && from_initiator)
			ct->flags &= ~FERRUM_POL_CT_CLOSING; /* the tuple is being reused */
		if (pol_ct_age(now, ct) > FERRUM_POL_CT_REFRESH_NS)
			ct->last_ns = now;
		f->rule_id = ct->rule_id;
		return POLICY_ALLOW;
	}

	/* A new connection: this packet's source opened it. */
	f->reply = 0;
	if (policy_decide(initiator, f->daddr, f->proto, f->dport, &rule, &reason) == POLICY_DENY) {
		drop_rule(skb, reason, f, rule);
		return POLICY_DENY;
	}
	nct.last_ns = now;
	nct.initiator = initiator;
	nct.gen = cfg->policy_gen;
	nct.rule_id = rule;
	nct.flags = src_is_a ? FERRUM_POL_CT_A_INITIATED : 0;
	if (f->tcp_flags & (TCP_FIN | TCP_RST))
		nct.flags |= FERRUM_POL_CT_CLOSING;
	bpf_map_update_elem(&ferrum_pol_ct, &key, &nct, BPF_ANY);
	f->rule_id = rule;
	return POLICY_ALLOW;
}

/* A global function: the verifier checks it once, not again at each of the six places that
 * call it (inlined, they multiplied the programs' verification work). */
__attribute__((noinline)) int ferrum_policy_check(struct __sk_buff *skb, struct flow *f,
						  __u32 initiator)
{
	struct ferrum_config *cfg = config();

	if (!cfg || !f)
		return POLICY_ALLOW;
	return policy_check_inline(skb, cfg, f, initiator);
}

/* Policy for a reply that lb_rev_nat has just translated back to the frontend: judged on the
 * tuple it had before (the one its connection is tracked under), saved in `wire`. */
struct wire_tuple {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
};

static __always_inline int policy_check_wire(struct __sk_buff *skb, struct flow *f,
					     const struct wire_tuple *wire)
{
	struct wire_tuple now = { f->saddr, f->daddr, f->sport, f->dport };
	int rc;

	f->saddr = wire->saddr;
	f->daddr = wire->daddr;
	f->sport = wire->sport;
	f->dport = wire->dport;
	rc = ferrum_policy_check(skb, f, wire->saddr);
	f->saddr = now.saddr;
	f->daddr = now.daddr;
	f->sport = now.sport;
	f->dport = now.dport;
	return rc;
}

/* How long a SNAT port stays bound to its flow after the flow's last packet. Expired ports are
 * taken by new flows when needed; memory is bounded by the LRU maps either way. */
#define FERRUM_NAT_TCP_NS (6ULL * 3600 * 1000000000ULL)	 /* established (as Cilium) */
#define FERRUM_NAT_TCP_OPENING_NS (60ULL * 1000000000ULL) /* no answer yet */
#define FERRUM_NAT_TCP_CLOSING_NS (10ULL * 1000000000ULL) /* after FIN or RST */
#define FERRUM_NAT_OTHER_NS (60ULL * 1000000000ULL)	 /* UDP, ICMP echo */
#define FERRUM_NAT_REFRESH_NS 1000000000ULL /* last_ns is rewritten at most once a second */

static __always_inline int nat_expired(const struct ferrum_nat_value *v, __u8 proto, __u64 now)
{
	__u64 lifetime = FERRUM_NAT_OTHER_NS;

	if (proto == IPPROTO_TCP)
		lifetime = (v->flags & FERRUM_NAT_CLOSING)  ? FERRUM_NAT_TCP_CLOSING_NS :
			   (v->flags & FERRUM_NAT_REPLIED) ? FERRUM_NAT_TCP_NS :
							     FERRUM_NAT_TCP_OPENING_NS;
	/* Entries stamped by older programs' precise clock may be a tick ahead. */
	return now > v->last_ns && now - v->last_ns >= lifetime;
}

/* A packet of the flow a reverse entry belongs to, in either direction: keeps the port bound
 * and follows the TCP connection's end (a new SYN on a reused tuple starts over). */
static __always_inline void nat_seen(struct ferrum_nat_value *rv, const struct flow *f, int reply,
				     __u64 now)
{
	__u16 flags = rv->flags;

	if (reply)
		flags |= FERRUM_NAT_REPLIED;
	if (f->proto == IPPROTO_TCP) {
		if (f->tcp_flags & (TCP_FIN | TCP_RST))
			flags |= FERRUM_NAT_CLOSING;
		else if (!reply && (f->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN)
			flags = 0;
	}
	if (flags != rv->flags)
		rv->flags = flags;
	if (now > rv->last_ns + FERRUM_NAT_REFRESH_NS)
		rv->last_ns = now;
}

/* ---- Service load balancing ------------------------------------------------------------ */

#define LB_CONTINUE -1
#define LB_TRANSLATED -2
static __always_inline __u32 flow_hash(const struct ferrum_nat_key *k);
static __always_inline void lb_snat_seen(const struct ferrum_nat_key *rkey, const struct flow *f,
					 int reply);
static __always_inline int rewrite(struct __sk_buff *skb, const struct flow *f, int src,
				   __u32 old_addr, __u32 new_addr, __u16 old_port, __u16 new_port);
#define ICMP_DEST_UNREACH 3
#define ICMP_PORT_UNREACH 3

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ferrum_lb_key);
	__type(value, struct ferrum_lb_service);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_lb_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ferrum_lb_backend_key);
	__type(value, struct ferrum_lb_backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_lb_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ferrum_nat_key);
	__type(value, struct ferrum_lb_ct);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_lb_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ferrum_nat_key);
	__type(value, struct ferrum_lb_rev);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_lb_rev SEC(".maps");

/* Masqueraded external clients (externalTrafficPolicy=Cluster): when each reverse entry's flow
 * last sent a packet, so that its port on the node IP goes to a new flow once it expired. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ferrum_nat_key);
	__type(value, struct ferrum_nat_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_lb_snat_seen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ferrum_lb_maglev_key);
	__type(value, struct ferrum_lb_maglev_chunk);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_lb_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ferrum_lb_affinity_key);
	__type(value, struct ferrum_lb_affinity);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_lb_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ferrum_lb_range_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_lb_ranges SEC(".maps");

static __always_inline int lb_proto(const struct flow *f)
{
	return f->has_ports && (f->proto == IPPROTO_TCP || f->proto == IPPROTO_UDP);
}

static __always_inline __u16 csum_fold32(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* Completes an IPv4 header without options that the caller zeroed (and gave a tos or id, if it
 * wants them): version, length, TTL, protocol, addresses, then the checksum over all of it. */
static __always_inline void ipv4_header_fill(struct iphdr *ip, __u8 proto, __u32 saddr,
					     __u32 daddr, __u16 tot_len, __u8 ttl)
{
	ip->version = 4;
	ip->ihl = 5;
	ip->tot_len = bpf_htons(tot_len);
	ip->ttl = ttl;
	ip->protocol = proto;
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->check = 0;
	ip->check = csum_fold32(bpf_csum_diff(NULL, 0, (__be32 *)ip, sizeof(*ip), 0));
}

/* Reply of a balanced flow (backend -> client): the source becomes the frontend again, and a
 * client whose address was replaced (hairpin, masquerade) gets it back as the destination.
 * Returns -1 on a failed rewrite, 1 when the client is outside the cluster (the caller sends
 * the reply out of the uplink), 0 otherwise (translated or not). */
static __always_inline int lb_rev_nat(struct __sk_buff *skb, const struct ferrum_config *cfg,
				      struct flow *f)
{
	struct ferrum_nat_key key = {};
	struct ferrum_lb_rev *rev;
	__u32 vip, client, flags;
	__u16 vport, cport;

	if (!lb_proto(f))
		return 0;
	key.addr_a = f->saddr;
	key.addr_b = f->daddr;
	key.port_a = f->sport;
	key.port_b = f->dport;
	key.proto = f->proto;
	rev = bpf_map_lookup_elem(&ferrum_lb_rev, &key);
	if (!rev)
		return 0;
	f->lb_rev = 1;
	if (rev->client_addr && f->daddr == cfg->node_ip)
		lb_snat_seen(&key, f, 1);
	vip = rev->frontend_addr;
	vport = rev->frontend_port;
	client = rev->client_addr;
	cport = rev->client_port;
	flags = rev->flags;
	if (rewrite(skb, f, 1, f->saddr, vip, f->sport, vport) < 0)
		return -1;
	f->saddr = vip;
	f->sport = vport;
	if (client) {
		if (rewrite(skb, f, 0, f->daddr, client, f->dport, cport) < 0)
			return -1;
		f->daddr = client;
		f->dport = cport;
	}
	trace(skb, cfg, FERRUM_TRACE_LB_REV_DNAT, f, 0, vip, vport);
	return (flags & FERRUM_LB_REV_EXTERNAL) ? 1 : 0;
}

/* Sends a packet for a client outside the cluster straight out of the uplink (the stack would
 * drop it: its source is now this node's own address). */
static __always_inline int lb_out_uplink(const struct ferrum_config *cfg)
{
	return bpf_redirect_neigh(cfg->uplink_ifindex, NULL, 0, 0);
}

/* No usable backend: turn the packet into an ICMP port unreachable from the frontend and send
 * it straight back to the client (into its pod, or out of the uplink when `client` is NULL),
 * so connect() fails at once (TCP and UDP alike). */
static __always_inline int lb_reject(struct __sk_buff *skb, const struct ferrum_config *cfg,
				     const struct ferrum_endpoint *client, const struct flow *f)
{
	struct {
		__u8 type;
		__u8 code;
		__u16 checksum;
		__u32 unused;
	} icmp = {};
	struct iphdr ip = {};
	__u8 quoted[28]; /* the offending IP header and the first 8 bytes of its payload */
	__u32 sum;
	void *data, *data_end;
	struct ethhdr *eth;

	emit(skb, FERRUM_EVENT_DROP, FERRUM_DROP_NO_BACKEND, f, 0, 0, 0);
	/* IP options: quoting them is not worth the complexity. A later fragment: the client
	 * got its error with the first one. */
	if (f->l4_off != ETH_HLEN + sizeof(struct iphdr) || f->frag_later)
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, quoted, sizeof(quoted)) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(ip) + sizeof(icmp) + sizeof(quoted), 0) < 0)
		return TC_ACT_SHOT;

	ip.tos = 0xc0;
	ipv4_header_fill(&ip, IPPROTO_ICMP, f->daddr, f->saddr,
			 sizeof(ip) + sizeof(icmp) + sizeof(quoted), 64);
	icmp.type = ICMP_DEST_UNREACH;
	icmp.code = ICMP_PORT_UNREACH;
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&icmp, sizeof(icmp), 0);
	sum = bpf_csum_diff(NULL, 0, (__be32 *)quoted, sizeof(quoted), sum);
	icmp.checksum = csum_fold32(sum);

	if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), &icmp, sizeof(icmp), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip) + sizeof(icmp), quoted, sizeof(quoted),
				0) < 0)
		return TC_ACT_SHOT;
	if (!client)
		return lb_out_uplink(cfg);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_SHOT;
	__builtin_memcpy(eth->h_dest, client->pod_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, client->host_mac, ETH_ALEN);
	return bpf_redirect_peer(client->ifindex, 0);
}

/* Picks a backend for a new flow: the client's affine backend while its affinity lasts, else
 * by Maglev (hash of the flow into the frontend's table) or at random. Returns 0 and fills
 * `out`, or -1 when there is none. */
static __always_inline int lb_pick(const struct ferrum_lb_service *svc,
				   const struct ferrum_nat_key *fwd, struct ferrum_lb_backend *out)
{
	struct ferrum_lb_backend_key bkey = {};
	struct ferrum_lb_affinity_key akey = {};
	struct ferrum_lb_affinity *aff, naff = {};
	struct ferrum_lb_backend *b;
	__u64 now = 0;

	if (!svc->count)
		return -1;
	if (svc->affinity_timeout) {
		now = bpf_ktime_get_ns();
		akey.id = svc->id;
		akey.client = fwd->addr_a;
		aff = bpf_map_lookup_elem(&ferrum_lb_affinity, &akey);
		if (aff && now - aff->last_ns < (__u64)svc->affinity_timeout * 1000000000ULL) {
			out->addr = aff->backend_addr;
			out->port = aff->backend_port;
			aff->last_ns = now;
			return 0;
		}
	}
	bkey.id = svc->id;
	if (svc->algorithm == FERRUM_LB_ALGO_MAGLEV) {
		struct ferrum_lb_maglev_key mkey = {};
		struct ferrum_lb_maglev_chunk *chunk;
		__u32 h = flow_hash(fwd) % FERRUM_MAGLEV_SIZE;
		mkey.id = svc->id;
		mkey.chunk = h / FERRUM_MAGLEV_CHUNK;
		chunk = bpf_map_lookup_elem(&ferrum_lb_maglev, &mkey);
		if (!chunk)
			return -1;
		bkey.slot = chunk->slots[h & (FERRUM_MAGLEV_CHUNK - 1)];
	} else {
		bkey.slot = bpf_get_prandom_u32() % svc->count + 1;
	}
	b = bpf_map_lookup_elem(&ferrum_lb_backends, &bkey);
	if (!b)
		return -1;
	*out = *b;
	if (svc->affinity_timeout) {
		naff.backend_addr = b->addr;
		naff.backend_port = b->port;
		naff.last_ns = now;
		bpf_map_update_elem(&ferrum_lb_affinity, &akey, &naff, BPF_ANY);
	}
	return 0;
}

/* loadBalancerSourceRanges: is the client allowed to use this frontend? */
static __always_inline int lb_source_allowed(const struct ferrum_lb_service *svc, __u32 saddr)
{
	struct ferrum_lb_range_key key = {};

	if (!(svc->flags & FERRUM_LB_FLAG_SOURCE_RANGES))
		return 1;
	key.prefixlen = 64;
	key.id = bpf_htonl(svc->id);
	key.addr = saddr;
	return bpf_map_lookup_elem(&ferrum_lb_ranges, &key) != NULL;
}

/* Reserves a source port on the node IP for a masqueraded external client: the reverse entry
 * (backend, node, backend port, port) is created here with BPF_NOEXIST. Returns the port in
 * network order, 0 when none is free. */
static __always_inline __u16 lb_snat_port(const struct ferrum_config *cfg,
					   const struct ferrum_lb_backend *backend,
					   const struct ferrum_nat_key *fwd,
					   const struct ferrum_lb_rev *rev)
{
	struct ferrum_nat_key rkey = {};
	struct ferrum_nat_value seen = {};
	__u64 now = bpf_ktime_get_coarse_ns();
	__u32 range, start, i;

	if (cfg->nat_port_max < cfg->nat_port_min || cfg->nat_port_min == 0)
		return 0;
	range = (__u32)cfg->nat_port_max - cfg->nat_port_min + 1;
	start = flow_hash(fwd) % range;
	rkey.addr_a = backend->addr;
	rkey.addr_b = cfg->node_ip;
	rkey.port_a = backend->port;
	rkey.proto = fwd->proto;
	seen.last_ns = now;
	for (i = 0; i < NAT_PORT_TRIES && i < range; i++) {
		__u16 port = bpf_htons((__u16)(cfg->nat_port_min + (start + i) % range));
		int rc;

		rkey.port_b = port;
		rc = bpf_map_update_elem(&ferrum_lb_rev, &rkey, rev, BPF_NOEXIST);
		if (rc < 0) {
			/* Held by a flow that has expired (or was never seen): free again. As for
			 * pod SNAT, delete then NOEXIST so that one of two racing flows wins. */
			struct ferrum_nat_value *last = bpf_map_lookup_elem(&ferrum_lb_snat_seen, &rkey);

			if (last && !nat_expired(last, fwd->proto, now))
				continue;
			bpf_map_delete_elem(&ferrum_lb_rev, &rkey);
			rc = bpf_map_update_elem(&ferrum_lb_rev, &rkey, rev, BPF_NOEXIST);
		}
		if (rc == 0) {
			bpf_map_update_elem(&ferrum_lb_snat_seen, &rkey, &seen, BPF_ANY);
			return port;
		}
	}
	return 0;
}

/* A packet of a masqueraded flow (reverse key `rkey`), either direction: see nat_seen. */
static __always_inline void lb_snat_seen(const struct ferrum_nat_key *rkey, const struct flow *f,
					 int reply)
{
	struct ferrum_nat_value *last = bpf_map_lookup_elem(&ferrum_lb_snat_seen, rkey);
	__u64 now = bpf_ktime_get_coarse_ns();

	if (last) {
		nat_seen(last, f, reply, now);
	} else if (!reply) {
		/* Evicted, or a flow from before ports expired: from now on it is seen. */
		struct ferrum_nat_value fresh = { .last_ns = now };
		bpf_map_update_elem(&ferrum_lb_snat_seen, rkey, &fresh, BPF_NOEXIST);
	}
}

/* DNAT (and, for masqueraded or hairpinned clients, SNAT) of a balanced flow; scope external:
 * the client is outside the cluster. Returns LB_TRANSLATED (route the packet on to the
 * backend), LB_CONTINUE (no such frontend) or a verdict. */
static __always_inline int lb_translate_inline(struct __sk_buff *skb,
					       const struct ferrum_config *cfg,
					const struct ferrum_endpoint *src_ep, struct flow *f,
					__u8 scope)
{
	struct ferrum_lb_key key = {};
	struct ferrum_lb_service *svc;
	struct ferrum_nat_key fwd = {}, rkey = {};
	struct ferrum_lb_ct *ct, newct = {};
	struct ferrum_lb_rev rev = {};
	struct ferrum_lb_backend backend = {};
	__u32 vip = f->daddr;
	__u16 vport = f->dport;
	int external = scope == FERRUM_LB_SCOPE_EXTERNAL;

	key.addr = f->daddr;
	key.port = f->dport;
	key.proto = f->proto;
	key.scope = scope;
	svc = bpf_map_lookup_elem(&ferrum_lb_services, &key);
	if (!svc)
		return LB_CONTINUE;
	f->svc_id = svc->id;
	if (!lb_source_allowed(svc, f->saddr))
		return drop(skb, FERRUM_DROP_LB_SOURCE_DENIED, f);

	fwd.addr_a = f->saddr;
	fwd.addr_b = f->daddr;
	fwd.port_a = f->sport;
	fwd.port_b = f->dport;
	fwd.proto = f->proto;
	ct = bpf_map_lookup_elem(&ferrum_lb_ct, &fwd);
	if (ct && ct->id == svc->id) {
		backend.addr = ct->backend_addr;
		backend.port = ct->backend_port;
		newct = *ct;
	} else {
		if (lb_pick(svc, &fwd, &backend) < 0)
			return lb_reject(skb, cfg, src_ep, f);
		newct.backend_addr = backend.addr;
		newct.backend_port = backend.port;
		newct.id = svc->id;
		rev.frontend_addr = vip;
		rev.frontend_port = vport;
		rev.flags = external ? FERRUM_LB_REV_EXTERNAL : 0;
		if (external && (svc->flags & FERRUM_LB_FLAG_MASQUERADE)) {
			/* externalTrafficPolicy=Cluster: the backend answers this node. */
			rev.client_addr = f->saddr;
			rev.client_port = f->sport;
			newct.snat_port = lb_snat_port(cfg, &backend, &fwd, &rev);
			if (!newct.snat_port)
				return drop(skb, FERRUM_DROP_NAT_NO_PORT, f);
			newct.snat_addr = cfg->node_ip;
		} else if (backend.addr == f->saddr) {
			/* A pod reaching itself would see its own address as the source and drop it. */
			newct.snat_addr = bpf_htonl(FERRUM_HAIRPIN_ADDR_HOST);
			newct.snat_port = f->sport;
		}
		bpf_map_update_elem(&ferrum_lb_ct, &fwd, &newct, BPF_ANY);
	}

	/* The reverse entry (restored if the LRU evicted it). */
	rkey.addr_a = backend.addr;
	rkey.addr_b = newct.snat_addr ? newct.snat_addr : f->saddr;
	rkey.port_a = backend.port;
	rkey.port_b = newct.snat_addr ? newct.snat_port : f->sport;
	rkey.proto = f->proto;
	if (!bpf_map_lookup_elem(&ferrum_lb_rev, &rkey)) {
		rev.frontend_addr = vip;
		rev.frontend_port = vport;
		rev.client_addr = newct.snat_addr ? f->saddr : 0;
		rev.client_port = newct.snat_addr ? f->sport : 0;
		rev.flags = external ? FERRUM_LB_REV_EXTERNAL : 0;
		bpf_map_update_elem(&ferrum_lb_rev, &rkey, &rev, BPF_ANY);
	}
	if (newct.snat_addr && newct.snat_addr == cfg->node_ip)
		lb_snat_seen(&rkey, f, 0);

	if (rewrite(skb, f, 0, f->daddr, backend.addr, f->dport, backend.port) < 0)
		return drop(skb, FERRUM_DROP_REWRITE_FAILED, f);
	f->daddr = backend.addr;
	f->dport = backend.port;
	if (newct.snat_addr) {
		if (rewrite(skb, f, 1, f->saddr, newct.snat_addr, f->sport, newct.snat_port) < 0)
			return drop(skb, FERRUM_DROP_REWRITE_FAILED, f);
		f->saddr = newct.snat_addr;
		f->sport = newct.snat_port;
	}
	trace(skb, cfg, FERRUM_TRACE_LB_DNAT, f, 0, vip, vport);
	return LB_TRANSLATED;
}

/* Global, like ferrum_policy_check: verified once, and its stack is not added to the callers'
 * (from_pod and from_uplink would otherwise exceed the 512-byte BPF stack with the policy
 * stage below them). */
__attribute__((noinline)) int ferrum_lb_translate(struct __sk_buff *skb,
						  const struct ferrum_endpoint *src_ep,
						  struct flow *f, __u32 scope)
{
	struct ferrum_config *cfg = config();

	if (!cfg || !f)
		return LB_CONTINUE;
	return lb_translate_inline(skb, cfg, src_ep, f, scope);
}

/* Ones-complement checksum after a 16-bit word changes (RFC 1624); on raw memory values, so
 * byte order does not matter as long as all are loaded alike. */
static __always_inline __u16 csum_replace_u16(__u16 check, __u16 from, __u16 to)
{
	__u32 s = (__u16)~check + (__u32)(__u16)~from + to;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return ~(__u16)s;
}

static __always_inline __u16 csum_replace_u32(__u16 check, __u32 from, __u32 to)
{
	check = csum_replace_u16(check, (__u16)from, (__u16)to);
	return csum_replace_u16(check, (__u16)(from >> 16), (__u16)(to >> 16));
}

/* Rewrites a 16-bit checksum field inside an ICMP error's quoted packet and keeps the ICMP
 * checksum (which covers the field) right. Fields beyond a truncated quote are left alone. */
static __always_inline int quoted_csum_update(struct __sk_buff *skb, __u32 icmp_csum, __u32 off,
					      __u32 from, __u32 to, int words, int udp)
{
	__u16 old, new;

	if (bpf_skb_load_bytes(skb, off, &old, sizeof(old)) < 0 || (udp && !old))
		return 0;
	new = words == 2 ? csum_replace_u32(old, from, to) :
			   csum_replace_u16(old, (__u16)from, (__u16)to);
	if (udp && !new)
		new = 0xffff;
	if (bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0) < 0 ||
	    bpf_l4_csum_replace(skb, icmp_csum, old, new, sizeof(new)) < 0)
		return -1;
	return 0;
}

/* Quotes icmp_quote_rewrite can translate: TCP, UDP and ICMP echo (SCTP's CRC32c cannot be
 * updated incrementally, and nothing translates SCTP anyway). */
static __always_inline int quote_rewritable(const struct icmp_quote *q)
{
	return q->ip.protocol == IPPROTO_TCP || q->ip.protocol == IPPROTO_UDP ||
	       q->ip.protocol == IPPROTO_ICMP;
}

/* Rewrites the source (`src`) or destination address and port of a rewritable quote, keeping
 * its IP and transport checksums and the ICMP checksum right. */
static __always_inline int icmp_quote_rewrite(struct __sk_buff *skb, const struct flow *f,
					      const struct icmp_quote *q, int src, __u32 old_addr,
					      __u32 new_addr, __u16 old_port, __u16 new_port)
{
	__u32 icmp_csum = f->l4_off + offsetof(struct icmp_echo_hdr, checksum);
	int udp = q->ip.protocol == IPPROTO_UDP;
	int pseudo = udp || q->ip.protocol == IPPROTO_TCP;
	__u32 port_off, csum_off, addr_off;

	if (pseudo) {
		port_off = q->l4 + (src ? 0 : 2);
		csum_off = q->l4 + (udp ? 6 : 16);
	} else {
		port_off = q->l4 + offsetof(struct icmp_echo_hdr, id);
		csum_off = q->l4 + offsetof(struct icmp_echo_hdr, checksum);
	}
	addr_off = q->off + (src ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));
	/* The quoted transport checksum: the port, and for TCP/UDP the pseudo header. */
	if (pseudo && quoted_csum_update(skb, icmp_csum, csum_off, old_addr, new_addr, 2, udp) < 0)
		return -1;
	if (quoted_csum_update(skb, icmp_csum, csum_off, old_port, new_port, 1, udp) < 0 ||
	    bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0) < 0 ||
	    bpf_l4_csum_replace(skb, icmp_csum, old_port, new_port, sizeof(new_port)) < 0)
		return -1;
	/* The quoted address and its header checksum. */
	if (quoted_csum_update(skb, icmp_csum, q->off + offsetof(struct iphdr, check), old_addr,
			       new_addr, 2, 0) < 0 ||
	    bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(new_addr), 0) < 0 ||
	    bpf_l4_csum_replace(skb, icmp_csum, old_addr, new_addr, sizeof(new_addr)) < 0)
		return -1;
	return 0;
}

/* An ICMP error about a packet a pod sent to a Service frontend and this node translated to a
 * backend (the backend's UDP port unreachable, say): the quote, and the outer source when the
 * backend itself sent the error, are put back to the frontend, so that the client's socket,
 * connected to the frontend, receives it. Masqueraded and hairpin clients are left alone.
 * Returns 1 when translated, 0 when not a Service's, -1 when the rewrite failed. */
__attribute__((noinline)) int ferrum_lb_icmp_error(struct __sk_buff *skb, struct flow *f)
{
	struct ferrum_nat_key key = {};
	struct ferrum_lb_rev *rev;
	struct icmp_quote q;
	__u32 backend, vip;
	__u16 vport;

	if (!f || !is_icmp_error(f) || load_icmp_quote(skb, f, &q) < 0 || !quote_rewritable(&q) ||
	    q.ip.protocol == IPPROTO_ICMP)
		return 0;
	/* Oriented like the backend's reply. */
	key.addr_a = q.ip.daddr;
	key.addr_b = q.ip.saddr;
	key.port_a = q.dport;
	key.port_b = q.sport;
	key.proto = q.ip.protocol;
	rev = bpf_map_lookup_elem(&ferrum_lb_rev, &key);
	if (!rev || rev->client_addr)
		return 0;
	backend = q.ip.daddr;
	vip = rev->frontend_addr;
	vport = rev->frontend_port;
	if (icmp_quote_rewrite(skb, f, &q, 0, backend, vip, q.dport, vport) < 0)
		return -1;
	if (f->saddr == backend) {
		if (bpf_skb_store_bytes(skb, IP_SADDR_OFF, &vip, sizeof(vip), 0) < 0 ||
		    bpf_l3_csum_replace(skb, IP_CSUM_OFF, backend, vip, sizeof(vip)) < 0)
			return -1;
		f->saddr = vip;
	}
	return 1;
}

/* An ICMP error (fragmentation needed, unreachable, time exceeded) about a packet this node
 * SNAT'd belongs to the pod that sent it: the quoted packet gets the pod's address and port
 * back, the outer destination becomes the pod, and the error goes in as related traffic.
 * Without this, path MTU discovery fails for every pod connection leaving the cluster.
 * A global function: verified once, and it keeps from_uplink's stack small. Returns
 * ICMP_ERROR_TO_POD once the packet is the pod's, else a verdict. */
#define ICMP_ERROR_TO_POD -3
__attribute__((noinline)) int ferrum_snat_icmp_error(struct __sk_buff *skb, struct flow *f)
{
	struct ferrum_config *cfg = config();
	struct ferrum_nat_key rev = {};
	struct ferrum_nat_value *rv;
	struct icmp_quote q;
	__u32 node, pod_addr;
	__u16 pod_port;

	if (!cfg || !f)
		return TC_ACT_OK;
	node = cfg->node_ip;
	if (load_icmp_quote(skb, f, &q) < 0 || !quote_rewritable(&q) || q.ip.saddr != node)
		return TC_ACT_OK;
	/* Oriented like a reply: remote side first, this node's SNAT address and port second. */
	rev.addr_a = q.ip.daddr;
	rev.addr_b = node;
	rev.port_a = q.dport;
	rev.port_b = q.sport;
	rev.proto = q.ip.protocol;
	rv = bpf_map_lookup_elem(&ferrum_nat_rev, &rev);
	if (!rv)
		return TC_ACT_OK;
	pod_addr = rv->addr;
	pod_port = rv->port;
	if (icmp_quote_rewrite(skb, f, &q, 1, node, pod_addr, q.sport, pod_port) < 0)
		return drop(skb, FERRUM_DROP_REWRITE_FAILED, f);
	/* The outer destination (ICMP has no pseudo header). */
	if (bpf_skb_store_bytes(skb, IP_DADDR_OFF, &pod_addr, sizeof(pod_addr), 0) < 0 ||
	    bpf_l3_csum_replace(skb, IP_CSUM_OFF, node, pod_addr, sizeof(pod_addr)) < 0)
		return drop(skb, FERRUM_DROP_REWRITE_FAILED, f);
	f->daddr = pod_addr;
	trace(skb, cfg, FERRUM_TRACE_REV_SNAT, f, 0, pod_addr, pod_port);
	return ICMP_ERROR_TO_POD;
}

/* ---- VXLAN in BPF ---------------------------------------------------------------------- */
/* A pod's packet to a pod on another node is encapsulated here and sent straight out of the
 * uplink, and the uplink decapsulates what other nodes send to local pods: no pass through the
 * VXLAN device (its route lookup and per-packet tunnel metadata) on the way out, and none
 * through the stack, the UDP socket and the VXLAN device on the way in. The headers are the
 * kernel's own VXLAN (RFC 7348, same port and VNI), so the VXLAN device still takes whatever
 * this path leaves to it: the node's own traffic, and packets this path does not handle. */
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7) /* kernel 6.3; older uapi headers lack it */
#endif
#define VXLAN_FLAG_VNI 0x08000000 /* the I flag: the VNI is valid */
#define VXLAN_SPORT_MIN 32768	  /* source ports spread flows over ECMP paths, */
#define VXLAN_SPORT_RANGE 28232	  /* over the kernel's default ephemeral range */

struct vxlan_encap {
	struct iphdr ip;
	struct udphdr udp;
	__be32 vx_flags;
	__be32 vx_vni;
	struct ethhdr inner;
};
/* The headers put in front of the frame's own: the struct's tail padding is not. */
#define VXLAN_ENCAP_LEN 50
_Static_assert(offsetof(struct vxlan_encap, inner) + sizeof(struct ethhdr) == VXLAN_ENCAP_LEN,
	       "VXLAN encapsulation layout");

/* Wraps the frame in outer IPv4/UDP/VXLAN headers from this node to `tunnel_endpoint` (network
 * order) and sends it out of the uplink (the kernel resolves the next hop). GSO packets keep
 * their segment size (the pod MTU leaves room for the headers) and are segmented as UDP
 * tunnel packets. Global, like the policy stage: its frame stays off from_pod's stack.
 * Returns the verdict, or -1 when the packet cannot be encapsulated here (nothing changed). */
__attribute__((noinline)) int ferrum_vxlan_encap(struct __sk_buff *skb, __u32 tunnel_endpoint,
						 __u32 flow_hash)
{
	struct ferrum_config *cfg = config();
	struct vxlan_encap h = {};
	__u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
		      BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH |
		      BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN);
	__u32 outer_len = skb->len - ETH_HLEN + VXLAN_ENCAP_LEN;

	if (!cfg || !cfg->uplink_ifindex || !cfg->node_ip || outer_len > 0xffff)
		return -1;
	if (bpf_skb_load_bytes(skb, 0, &h.inner, ETH_HLEN) < 0)
		return -1;
	if (bpf_skb_adjust_room(skb, VXLAN_ENCAP_LEN, BPF_ADJ_ROOM_MAC, flags) < 0)
		return -1;
	h.ip.id = (__u16)bpf_get_prandom_u32();
	ipv4_header_fill(&h.ip, IPPROTO_UDP, cfg->node_ip, tunnel_endpoint, outer_len, TUNNEL_TTL);
	h.udp.source = bpf_htons(VXLAN_SPORT_MIN + flow_hash % VXLAN_SPORT_RANGE);
	h.udp.dest = bpf_htons(FERRUM_VXLAN_PORT);
	h.udp.len = bpf_htons(outer_len - sizeof(struct iphdr));
	/* No UDP checksum (RFC 7348 allows zero over IPv4): the inner packet carries its own. */
	h.vx_flags = bpf_htonl(VXLAN_FLAG_VNI);
	h.vx_vni = bpf_htonl(cfg->vni << 8);
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &h, VXLAN_ENCAP_LEN, 0) < 0)
		return drop(skb, FERRUM_DROP_ENCAP_FAILED, NULL);
	return bpf_redirect_neigh(cfg->uplink_ifindex, NULL, 0, 0);
}

/* A packet for a pod on another node: wrapped in eBPF and sent out of the uplink, or, where that
 * cannot be done, handed to the VXLAN device with its tunnel key. */
static __always_inline int to_remote_node(struct __sk_buff *skb, const struct ferrum_config *cfg,
					  const struct flow *f, __u32 tunnel)
{
	int rc;

	if (!cfg->overlay_ifindex)
		return drop(skb, FERRUM_DROP_ENCAP_FAILED, f);
	trace(skb, cfg, FERRUM_TRACE_TO_OVERLAY, f, tunnel, 0, 0);
	rc = ferrum_vxlan_encap(skb, tunnel,
				mix32(f->saddr ^ mix32(f->daddr ^ (((__u32)f->sport << 16) | f->dport))));
	if (rc >= 0)
		return rc;
	/* Not here (say, a frame too large to wrap): the VXLAN device does it. */
	if (set_tunnel(skb, cfg, tunnel) < 0)
		return drop(skb, FERRUM_DROP_ENCAP_FAILED, f);
	return bpf_redirect(cfg->overlay_ifindex, 0);
}

/* tcx ingress on every host-side pod veth: packets leaving a pod. */
SEC("classifier/from_pod")
int from_pod(struct __sk_buff *skb)
{
	struct ferrum_config *cfg = config();
	struct ferrum_endpoint *src_ep, *dst_ep;
	struct ferrum_ipcache_key key;
	struct ferrum_ipcache_value *peer;
	struct flow f = {};
	struct wire_tuple wire;
	void *data, *data_end;
	struct ethhdr *eth;
	__u32 initiator;
	int rc;

	if (!cfg)
		return TC_ACT_SHOT;
	if (skb->protocol == bpf_htons(ETH_P_ARP))
		return from_pod_arp(skb);
	rc = parse_ipv4(skb, &f);
	if (rc == -1)
		return drop(skb, FERRUM_DROP_UNSUPPORTED_L3, NULL);
	if (rc < 0)
		return drop(skb, FERRUM_DROP_MALFORMED, NULL);

	/* Anti-spoofing: the source IP must belong to the endpoint behind this very veth. */
	src_ep = bpf_map_lookup_elem(&ferrum_endpoints, &f.saddr);
	if (!src_ep || src_ep->ifindex != skb->ifindex)
		return drop(skb, FERRUM_DROP_SPOOFED_IP, &f);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return drop(skb, FERRUM_DROP_MALFORMED, &f);
	if (!macs_equal(eth->h_source, src_ep->pod_mac))
		return drop(skb, FERRUM_DROP_SPOOFED_MAC, &f);

	/* Replies of balanced flows are translated back to the frontend; policy judges them by
	 * the tuple before that (the one their connection is tracked under). */
	wire = (struct wire_tuple){ f.saddr, f.daddr, f.sport, f.dport };
	initiator = f.saddr;
	if (lb_proto(&f)) {
		rc = lb_rev_nat(skb, cfg, &f);
		if (rc < 0)
			return drop(skb, FERRUM_DROP_REWRITE_FAILED, &f);
		if (f.lb_rev) {
			if (policy_check_wire(skb, &f, &wire) != POLICY_ALLOW)
				return TC_ACT_SHOT;
			if (rc > 0)
				return lb_out_uplink(cfg);
			goto route;
		}
		/* Requests to a frontend: policy and routing see the backend as the destination. */
		rc = ferrum_lb_translate(skb, src_ep, &f, FERRUM_LB_SCOPE_INTERNAL);
		if (rc != LB_TRANSLATED && rc != LB_CONTINUE)
			return rc;
	}
	/* The source pod's egress and, for a pod of this node, the destination's ingress. */
	if (ferrum_policy_check(skb, &f, initiator) != POLICY_ALLOW)
		return TC_ACT_SHOT;
	/* Judged as related to the connection it quotes; then put back to the frontend. */
	if (is_icmp_error(&f) && ferrum_lb_icmp_error(skb, &f) < 0)
		return drop(skb, FERRUM_DROP_REWRITE_FAILED, &f);

route:
	dst_ep = bpf_map_lookup_elem(&ferrum_endpoints, &f.daddr);
	if (dst_ep)
		return to_endpoint(skb, cfg, dst_ep, &f);

	key.prefixlen = 32;
	key.addr = f.daddr;
	peer = bpf_map_lookup_elem(&ferrum_ipcache, &key);
	if (peer && peer->tunnel_endpoint)
		return to_remote_node(skb, cfg, &f, peer->tunnel_endpoint);
	/* VNet mode: remote pods and nodes are on the underlay, which routes them natively. */
	if (peer && (peer->kind == FERRUM_KIND_REMOTE_POD_BLOCK ||
		     peer->kind == FERRUM_KIND_REMOTE_NODE)) {
		trace(skb, cfg, FERRUM_TRACE_TO_STACK, &f, 0, 0, 0);
		return TC_ACT_OK;
	}
	if (cfg->local_block_prefix_len &&
	    in_prefix(f.daddr, cfg->local_block_addr, cfg->local_block_prefix_len))
		return drop(skb, FERRUM_DROP_UNKNOWN_ENDPOINT, &f);

	trace(skb, cfg, FERRUM_TRACE_TO_STACK, &f, 0, 0, 0);
	return TC_ACT_OK;
}

/* A packet from another node (decapsulated, or routed natively in VNet mode): a reply of a
 * Service balanced on this node is translated back to its frontend, and a packet for a local
 * pod goes straight in after the pod's ingress policy. LB_CONTINUE: neither. */
static __always_inline int from_node(struct __sk_buff *skb, const struct ferrum_config *cfg,
				     struct flow *f)
{
	struct wire_tuple wire = { f->saddr, f->daddr, f->sport, f->dport };
	struct ferrum_endpoint *ep;
	int rc;

	rc = lb_rev_nat(skb, cfg, f);
	if (rc < 0)
		return drop(skb, FERRUM_DROP_REWRITE_FAILED, f);
	if (rc > 0)
		return lb_out_uplink(cfg);
	ep = bpf_map_lookup_elem(&ferrum_endpoints, &f->daddr);
	if (!ep)
		return LB_CONTINUE;
	/* The destination pod's ingress (on the tuple before any reverse translation). */
	if (policy_check_wire(skb, f, &wire) != POLICY_ALLOW)
		return TC_ACT_SHOT;
	if (is_icmp_error(f) && ferrum_lb_icmp_error(skb, f) < 0)
		return drop(skb, FERRUM_DROP_REWRITE_FAILED, f);
	return to_endpoint(skb, cfg, ep, f);
}

/* Decapsulates a VXLAN packet from another node (its outer IPv4 header without options, UDP to
 * this node's VXLAN port) when it is for a pod of this node; returns 0 then, and the caller
 * delivers it as from_overlay would. Anything else (another VNI, an outer fragment, an inner
 * destination that is not a local pod) is left to the VXLAN device: returns 1, nothing
 * changed. Global: its frame stays off from_uplink's. */
__attribute__((noinline)) int ferrum_vxlan_decap(struct __sk_buff *skb)
{
	struct ferrum_config *cfg = config();
	__u32 vxlan_off = ETH_HLEN + sizeof(struct iphdr) + sizeof(struct udphdr);
	__be32 vx[2], inner_daddr;
	__be16 frag_off, inner_proto;

	if (!cfg ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct iphdr, frag_off), &frag_off, 2) < 0 ||
	    bpf_skb_load_bytes(skb, vxlan_off, vx, sizeof(vx)) < 0 ||
	    bpf_skb_load_bytes(skb, vxlan_off + 8 + offsetof(struct ethhdr, h_proto), &inner_proto,
			       2) < 0 ||
	    bpf_skb_load_bytes(skb, vxlan_off + 8 + ETH_HLEN + offsetof(struct iphdr, daddr),
			       &inner_daddr, 4) < 0)
		return 1;
	if ((frag_off & bpf_htons(IP_FRAG_MF | IP_FRAG_OFFSET)) || !(vx[0] & bpf_htonl(VXLAN_FLAG_VNI)) ||
	    vx[1] != bpf_htonl(cfg->vni << 8) || inner_proto != bpf_htons(ETH_P_IP) ||
	    !bpf_map_lookup_elem(&ferrum_endpoints, &inner_daddr))
		return 1;
	if (bpf_skb_adjust_room(skb, -VXLAN_ENCAP_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4) < 0)
		return 1;
	return 0;
}

/* tcx ingress on the VXLAN device: decapsulated packets from other nodes. */
SEC("classifier/from_overlay")
int from_overlay(struct __sk_buff *skb)
{
	struct ferrum_config *cfg = config();
	struct flow f = {};
	int rc;

	if (!cfg || parse_ipv4(skb, &f) < 0)
		return TC_ACT_OK;
	rc = from_node(skb, cfg, &f);
	if (rc != LB_CONTINUE)
		return rc;
	/* The inner destination MAC belongs to the sender's side; make the stack accept it. */
	bpf_skb_change_type(skb, PACKET_HOST);
	trace(skb, cfg, FERRUM_TRACE_FROM_OVERLAY, &f, 0, 0, 0);
	return TC_ACT_OK;
}

SEC("classifier/to_overlay")
int to_overlay(struct __sk_buff *skb)
{
	struct ferrum_config *cfg = config();
	struct bpf_tunnel_key present;
	struct ferrum_ipcache_key key;
	struct ferrum_ipcache_value *peer;
	struct flow f = {};
	__u32 tunnel;
	int rc;

	if (!cfg)
		return TC_ACT_SHOT;
	/* Pod traffic comes with the tunnel from_pod set before redirecting it here; only what
	 * the host stack routes (the node's own traffic) needs the lookup. */
	if (bpf_skb_get_tunnel_key(skb, &present, sizeof(present), 0) == 0)
		return TC_ACT_OK;
	rc = parse_ipv4(skb, &f);
	if (rc == -1)
		return drop(skb, FERRUM_DROP_UNSUPPORTED_L3, NULL);
	if (rc < 0)
		return drop(skb, FERRUM_DROP_MALFORMED, NULL);
	key.prefixlen = 32;
	key.addr = f.daddr;
	peer = bpf_map_lookup_elem(&ferrum_ipcache, &key);
	if (!peer || !peer->tunnel_endpoint)
		return drop(skb, FERRUM_DROP_NO_TUNNEL_ENDPOINT, &f);
	tunnel = peer->tunnel_endpoint;
	if (set_tunnel(skb, cfg, tunnel) < 0)
		return drop(skb, FERRUM_DROP_ENCAP_FAILED, &f);
	/* Pod traffic was traced by from_pod already; this point reports the node's own. */
	if ((cfg->flags & FERRUM_FLAG_TRACE) && flow_event_due(cfg, FERRUM_TRACE_TO_OVERLAY, &f) &&
	    !bpf_map_lookup_elem(&ferrum_endpoints, &f.saddr))
		emit(skb, FERRUM_EVENT_TRACE, FERRUM_TRACE_TO_OVERLAY, &f, tunnel, 0, 0);
	return TC_ACT_OK;
}


static __always_inline __u32 flow_hash(const struct ferrum_nat_key *k)
{
	__u32 h = mix32(k->addr_a ^ 0x9e3779b9);
	h = mix32(h ^ k->addr_b);
	h = mix32(h ^ (((__u32)k->port_a << 16) | k->port_b));
	return mix32(h ^ k->proto);
}

struct l4_offsets {
	__u32 csum;
	__u32 port; /* the translated port / echo id */
	__u64 csum_flags; /* pseudo header and UDP zero-checksum handling */
};

/* Where the checksum and the translated port live; src selects the source side. */
static __always_inline int l4_offsets(const struct flow *f, int src, struct l4_offsets *o)
{
	switch (f->proto) {
	case IPPROTO_TCP:
		o->csum = f->l4_off + offsetof(struct tcphdr, check);
		o->port = f->l4_off + (src ? 0 : 2);
		o->csum_flags = BPF_F_PSEUDO_HDR;
		return 0;
	case IPPROTO_UDP:
		o->csum = f->l4_off + offsetof(struct udphdr, check);
		o->port = f->l4_off + (src ? 0 : 2);
		o->csum_flags = BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0;
		return 0;
	case IPPROTO_ICMP:
		o->csum = f->l4_off + offsetof(struct icmp_echo_hdr, checksum);
		o->port = f->l4_off + offsetof(struct icmp_echo_hdr, id);
		o->csum_flags = 0;
		return 0;
	}
	return -1;
}

/* Rewrites one address (at addr_off) and its port, fixing IP and L4 checksums. */
static __always_inline int rewrite(struct __sk_buff *skb, const struct flow *f, int src,
				   __u32 old_addr, __u32 new_addr, __u16 old_port, __u16 new_port)
{
	struct l4_offsets o;
	__u32 addr_off = src ? IP_SADDR_OFF : IP_DADDR_OFF;

	/* A later fragment has no transport header: the first one's checksum and port carry the
	 * translation for the whole datagram. */
	if (f->frag_later)
		goto l3;
	if (l4_offsets(f, src, &o) < 0)
		return -1;
	if (o.csum_flags & BPF_F_PSEUDO_HDR) {
		if (bpf_l4_csum_replace(skb, o.csum, old_addr, new_addr, o.csum_flags | 4) < 0)
			return -1;
	}
	if (bpf_l4_csum_replace(skb, o.csum, old_port, new_port,
				(o.csum_flags & BPF_F_MARK_MANGLED_0) | 2) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, o.port, &new_port, 2, 0) < 0)
		return -1;
l3:
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_addr, new_addr, 4) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, addr_off, &new_addr, 4, 0) < 0)
		return -1;
	return 0;
}

/* Finds the NAT port of a flow, allocating one (and both table entries) for a new flow.
 * Returns the port in network order, 0 when the range is exhausted. */
static __always_inline __u16 nat_port_for(const struct ferrum_config *cfg, const struct flow *f)
{
	struct ferrum_nat_key fwd = {}, rev = {};
	struct ferrum_nat_value *fv, *rv, val = {};
	__u64 now = bpf_ktime_get_coarse_ns();
	__u32 range, start, i;

	fwd.addr_a = f->saddr;
	fwd.addr_b = f->daddr;
	fwd.port_a = f->sport;
	fwd.port_b = f->dport;
	fwd.proto = f->proto;
	rev.addr_a = f->daddr;
	rev.addr_b = cfg->node_ip;
	rev.port_a = f->dport;
	rev.proto = f->proto;

	fv = bpf_map_lookup_elem(&ferrum_nat, &fwd);
	if (fv) {
		__u16 port = fv->port;
		rev.port_b = port;
		rv = bpf_map_lookup_elem(&ferrum_nat_rev, &rev);
		if (rv && rv->addr == f->saddr && rv->port == f->sport) {
			nat_seen(rv, f, 0, now);
			return port;
		}
		if (!rv) {
			/* LRU evicted only the reverse half: restore it if the port is still free. */
			val.addr = f->saddr;
			val.port = f->sport;
			val.last_ns = now;
			if (bpf_map_update_elem(&ferrum_nat_rev, &rev, &val, BPF_NOEXIST) == 0)
				return port;
		}
		/* Otherwise the port went to another flow after this one expired: pick anew. */
	}

	if (cfg->nat_port_max < cfg->nat_port_min || cfg->nat_port_min == 0)
		return 0;
	range = (__u32)cfg->nat_port_max - cfg->nat_port_min + 1;
	start = flow_hash(&fwd) % range;
	val.addr = f->saddr;
	val.port = f->sport;
	val.last_ns = now;
	for (i = 0; i < NAT_PORT_TRIES && i < range; i++) {
		__u16 port = bpf_htons((__u16)(cfg->nat_port_min + (start + i) % range));
		int rc;

		rev.port_b = port;
		rc = bpf_map_update_elem(&ferrum_nat_rev, &rev, &val, BPF_NOEXIST);
		if (rc < 0) {
			/* Taken: by an expired flow, the port is free again. Deleting first and
			 * inserting with NOEXIST lets only one of two racing new flows have it. */
			rv = bpf_map_lookup_elem(&ferrum_nat_rev, &rev);
			if (!rv || !nat_expired(rv, f->proto, now))
				continue;
			bpf_map_delete_elem(&ferrum_nat_rev, &rev);
			rc = bpf_map_update_elem(&ferrum_nat_rev, &rev, &val, BPF_NOEXIST);
		}
		if (rc == 0) {
			struct ferrum_nat_value fval = {};
			fval.addr = cfg->node_ip;
			fval.port = port;
			fval.last_ns = now;
			if (bpf_map_update_elem(&ferrum_nat, &fwd, &fval, BPF_ANY) < 0) {
				bpf_map_delete_elem(&ferrum_nat_rev, &rev);
				return 0;
			}
			return port;
		}
	}
	return 0;
}

/* tcx egress on the uplink: SNAT pod traffic leaving the cluster to the node IP. */
SEC("classifier/to_uplink")
int to_uplink(struct __sk_buff *skb)
{
	struct ferrum_config *cfg = config();
	struct flow f = {};
	__u16 nat_port;

	if (!cfg || !cfg->node_ip || !cfg->local_block_prefix_len)
		return TC_ACT_OK;
	if (parse_ipv4(skb, &f) < 0)
		return TC_ACT_OK;
	if (!in_prefix(f.saddr, cfg->local_block_addr, cfg->local_block_prefix_len) ||
	    f.saddr == cfg->node_ip ||
	    in_prefix(f.daddr, cfg->cluster_cidr_addr, cfg->cluster_cidr_prefix_len))
		return TC_ACT_OK;
	if (!f.has_ports || (f.proto == IPPROTO_ICMP && f.icmp_type != ICMP_ECHO))
		return TC_ACT_OK;

	nat_port = nat_port_for(cfg, &f);
	if (!nat_port)
		return drop(skb, FERRUM_DROP_NAT_NO_PORT, &f);
	if (rewrite(skb, &f, 1, f.saddr, cfg->node_ip, f.sport, nat_port) < 0)
		return drop(skb, FERRUM_DROP_REWRITE_FAILED, &f);
	trace(skb, cfg, FERRUM_TRACE_SNAT, &f, 0, cfg->node_ip, nat_port);
	return TC_ACT_OK;
}

/* External client -> frontend: translate, then deliver to a local backend or tunnel to the
 * backend's node. Returns LB_CONTINUE when the packet is not for a frontend. */
static __always_inline int lb_from_uplink(struct __sk_buff *skb, const struct ferrum_config *cfg,
					  struct flow *f)
{
	struct ferrum_ipcache_key key;
	struct ferrum_ipcache_value *peer;
	struct ferrum_endpoint *ep;
	__u32 client = f->saddr;
	int rc;

	rc = ferrum_lb_translate(skb, NULL, f, FERRUM_LB_SCOPE_EXTERNAL);
	if (rc != LB_TRANSLATED)
		return rc;
	ep = bpf_map_lookup_elem(&ferrum_endpoints, &f->daddr);
	if (ep) {
		/* A local backend's ingress judges the client itself, even when masqueraded. */
		if (ferrum_policy_check(skb, f, client) != POLICY_ALLOW)
			return TC_ACT_SHOT;
		return to_endpoint(skb, cfg, ep, f);
	}
	key.prefixlen = 32;
	key.addr = f->daddr;
	peer = bpf_map_lookup_elem(&ferrum_ipcache, &key);
	if (peer && peer->tunnel_endpoint)
		return to_remote_node(skb, cfg, f, peer->tunnel_endpoint);
	return drop(skb, FERRUM_DROP_UNKNOWN_ENDPOINT, f);
}

/* tcx ingress on the uplink: reverse-SNAT replies and hand them to the pod. */
SEC("classifier/from_uplink")
int from_uplink(struct __sk_buff *skb)
{
	struct ferrum_config *cfg = config();
	struct ferrum_nat_key rev = {};
	struct ferrum_nat_value *rv;
	struct ferrum_endpoint *ep;
	struct flow f = {};
	__u32 pod_addr;
	__u16 pod_port;
	int decapsulated = 0;

	if (!cfg || !cfg->node_ip)
		return TC_ACT_OK;
	if (parse_ipv4(skb, &f) < 0)
		return TC_ACT_OK;
	if (f.daddr == cfg->node_ip && is_icmp_error(&f)) {
		int rc = ferrum_snat_icmp_error(skb, &f);

		if (rc != ICMP_ERROR_TO_POD)
			return rc;
		ep = bpf_map_lookup_elem(&ferrum_endpoints, &f.daddr);
		if (!ep)
			return TC_ACT_OK;
		/* Related to the pod's connection: policy finds it through the quote. */
		if (ferrum_policy_check(skb, &f, f.saddr) != POLICY_ALLOW)
			return TC_ACT_SHOT;
		return to_endpoint(skb, cfg, ep, &f);
	}
	if (!f.has_ports)
		return TC_ACT_OK;
	/* The overlay's own datagrams, the bulk of what arrives here: no Service or NAT lookups.
	 * Those for local pods are decapsulated and delivered below; the rest go to the VXLAN
	 * device. */
	if (cfg->overlay_ifindex && f.proto == IPPROTO_UDP && f.daddr == cfg->node_ip &&
	    f.dport == bpf_htons(FERRUM_VXLAN_PORT)) {
		if (f.l4_off != ETH_HLEN + sizeof(struct iphdr) || ferrum_vxlan_decap(skb) != 0)
			return TC_ACT_OK;
		if (parse_ipv4(skb, &f) < 0)
			return drop(skb, FERRUM_DROP_MALFORMED, NULL);
		decapsulated = 1;
	} else if (lb_proto(&f)) {
		/* NodePorts, LoadBalancer IPs and externalIPs reached from outside the cluster. */
		int rc = lb_from_uplink(skb, cfg, &f);
		if (rc != LB_CONTINUE)
			return rc;
	}
	/* Decapsulated packets for local pods, and in VNet mode what other nodes' pods send to
	 * local pods natively over the underlay (Service replies from backends on other nodes
	 * come back this way too). */
	if (decapsulated || !cfg->overlay_ifindex) {
		int rc = from_node(skb, cfg, &f);
		if (rc != LB_CONTINUE)
			return rc;
		/* Its pod left between the decision to decapsulate and now. */
		if (decapsulated)
			return drop(skb, FERRUM_DROP_UNKNOWN_ENDPOINT, &f);
	}
	if (f.daddr != cfg->node_ip)
		return TC_ACT_OK;
	if (f.proto == IPPROTO_ICMP && f.icmp_type != ICMP_ECHOREPLY)
		return TC_ACT_OK;
	rev.addr_a = f.saddr;
	rev.addr_b = f.daddr;
	rev.port_a = f.sport;
	rev.port_b = f.dport;
	rev.proto = f.proto;
	rv = bpf_map_lookup_elem(&ferrum_nat_rev, &rev);
	if (!rv)
		return TC_ACT_OK;
	nat_seen(rv, &f, 1, bpf_ktime_get_coarse_ns());
	pod_addr = rv->addr;
	pod_port = rv->port;
	if (rewrite(skb, &f, 0, f.daddr, pod_addr, f.dport, pod_port) < 0)
		return drop(skb, FERRUM_DROP_REWRITE_FAILED, &f);
	trace(skb, cfg, FERRUM_TRACE_REV_SNAT, &f, 0, pod_addr, pod_port);
	f.daddr = pod_addr;
	f.dport = pod_port;
	ep = bpf_map_lookup_elem(&ferrum_endpoints, &pod_addr);
	if (ep) {
		if (ferrum_policy_check(skb, &f, f.saddr) != POLICY_ALLOW)
			return TC_ACT_SHOT;
		return to_endpoint(skb, cfg, ep, &f);
	}
	return TC_ACT_OK;
}

/* tcx egress on the node's host device (ferrum_host, one end of a veth pair), where the host
 * stack routes every local pod's /32: the node's own traffic to its pods, and in VNet mode
 * what the uplink hands the stack (ICMP errors, fragments it has no ports for). One node-level hook instead of one per pod keeps CNI ADD to a
 * single tcx attach. Packets the programs above redirect straight into a pod never come here:
 * they were judged where they were redirected. */
SEC("classifier/to_pod")
int to_pod(struct __sk_buff *skb)
{
	struct ferrum_config *cfg = config();
	struct ferrum_endpoint *ep;
	struct flow f = {};
	int rc;

	if (!cfg)
		return TC_ACT_SHOT;
	rc = parse_ipv4(skb, &f);
	if (rc == -1)
		return drop(skb, FERRUM_DROP_UNSUPPORTED_L3, NULL);
	if (rc < 0)
		return drop(skb, FERRUM_DROP_MALFORMED, NULL);
	ep = bpf_map_lookup_elem(&ferrum_endpoints, &f.daddr);
	if (!ep)
		return drop(skb, FERRUM_DROP_UNKNOWN_ENDPOINT, &f);
	if (ferrum_policy_check(skb, &f, f.saddr) != POLICY_ALLOW)
		return TC_ACT_SHOT;
	/* VNet: a remote backend's ICMP errors come this way (they carry no ports). */
	if (is_icmp_error(&f) && ferrum_lb_icmp_error(skb, &f) < 0)
		return drop(skb, FERRUM_DROP_REWRITE_FAILED, &f);
	return deliver_to_endpoint(skb, cfg, ep, &f, 0);
}

/* ---- Socket-level load balancing (cgroup sock_addr hooks) ------------------------------ */

#define AF_INET 2 /* sys/socket.h is libc's, not the BPF target's */
/* Processes in a node's own network namespace (attached on the node's cgroup) reach Services
 * by having connect()/sendmsg() translated to a backend before any packet exists. */

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ferrum_lb_sock_key);
	__type(value, struct ferrum_lb_sock_rev);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrum_lb_sock_rev SEC(".maps");

/* Returns 1 (translated or not a Service) or 0 (a Service without backends: refuse). */
static __always_inline int lb_sock_translate(struct bpf_sock_addr *ctx, int remember)
{
	struct ferrum_config *cfg = config();
	struct ferrum_lb_key key = {};
	struct ferrum_lb_service *svc;
	struct ferrum_nat_key fwd = {};
	struct ferrum_lb_backend backend = {};
	__u64 cookie;

	if (ctx->user_family != AF_INET)
		return 1;
	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return 1;
	key.addr = ctx->user_ip4;
	key.port = (__u16)ctx->user_port;
	key.proto = ctx->protocol;
	key.scope = FERRUM_LB_SCOPE_INTERNAL;
	svc = bpf_map_lookup_elem(&ferrum_lb_services, &key);
	if (!svc)
		return 1;
	cookie = bpf_get_socket_cookie(ctx);
	/* The "flow" of a socket: this node as the client, the cookie as its port. */
	fwd.addr_a = cfg ? cfg->node_ip : 0;
	fwd.addr_b = key.addr;
	fwd.port_a = (__u16)cookie;
	fwd.port_b = key.port;
	fwd.proto = key.proto;
	if (lb_pick(svc, &fwd, &backend) < 0)
		return 0;
	if (remember) {
		struct ferrum_lb_sock_key skey = {};
		struct ferrum_lb_sock_rev srev = {};
		skey.cookie = cookie;
		skey.addr = backend.addr;
		skey.port = backend.port;
		srev.frontend_addr = key.addr;
		srev.frontend_port = key.port;
		bpf_map_update_elem(&ferrum_lb_sock_rev, &skey, &srev, BPF_ANY);
	}
	ctx->user_ip4 = backend.addr;
	ctx->user_port = backend.port;
	return 1;
}

SEC("cgroup/connect4")
int ferrum_connect4(struct bpf_sock_addr *ctx)
{
	/* Connected UDP sockets also get replies through recvmsg: remember those. */
	return lb_sock_translate(ctx, ctx->protocol == IPPROTO_UDP);
}

SEC("cgroup/sendmsg4")
int ferrum_sendmsg4(struct bpf_sock_addr *ctx)
{
	return lb_sock_translate(ctx, 1);
}

SEC("cgroup/recvmsg4")
int ferrum_recvmsg4(struct bpf_sock_addr *ctx)
{
	struct ferrum_lb_sock_key skey = {};
	struct ferrum_lb_sock_rev *srev;

	if (ctx->user_family != AF_INET)
		return 1;
	skey.cookie = bpf_get_socket_cookie(ctx);
	skey.addr = ctx->user_ip4;
	skey.port = (__u16)ctx->user_port;
	srev = bpf_map_lookup_elem(&ferrum_lb_sock_rev, &skey);
	if (srev) {
		ctx->user_ip4 = srev->frontend_addr;
		ctx->user_port = srev->frontend_port;
	}
	return 1;
}

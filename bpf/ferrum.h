/* Structures shared by the eBPF programs and the Rust loader
 * (crates/datapath/src/bpf/abi.rs mirrors them; sizes are asserted on both sides).
 * Addresses and ports are in network byte order unless a field says otherwise. */
#ifndef FERRUM_H
#define FERRUM_H

#include <linux/types.h>

/* ferrum_config: one entry, written by the agent. */
struct ferrum_config {
	__u32 node_ip;
	__u32 cluster_cidr_addr;
	__u32 cluster_cidr_prefix_len;
	__u32 local_block_addr;
	__u32 local_block_prefix_len;
	__u32 overlay_ifindex;
	__u32 uplink_ifindex;
	__u32 vni; /* host order */
	__u16 nat_port_min; /* host order */
	__u16 nat_port_max; /* host order */
	__u32 flags;
	/* Bumped by the agent after every policy change: connections tracked under an older
	 * generation are judged again on their next packet. */
	__u32 policy_gen;
};
#define FERRUM_CONFIG_SIZE 44
/* UDP port of the overlay (the agent's ferrum_vxlan device); Rust: bpf::VXLAN_PORT. */
#define FERRUM_VXLAN_PORT 8472
/* Flow events for forwarded traffic: connection starts/ends (TCP SYN/FIN/RST) and, for other
 * protocols, one event per flow and observation point per aggregation interval. */
#define FERRUM_FLAG_TRACE (1U << 0)
/* With FERRUM_FLAG_TRACE: an event for every forwarded packet (debugging; costs throughput). */
#define FERRUM_FLAG_TRACE_ALL (1U << 1)
/* Aggregation interval of non-TCP flows' trace events. */
#define FERRUM_FLOW_AGG_NS 1000000000ULL

/* ferrum_endpoints: local pod IPv4 -> endpoint. */
struct ferrum_endpoint {
	__u32 ifindex; /* host-side veth */
	__u8 pod_mac[6];
	__u8 host_mac[6];
	__u32 flags;
};
#define FERRUM_ENDPOINT_SIZE 20

/* ferrum_ipcache: LPM trie key and value. */
struct ferrum_ipcache_key {
	__u32 prefixlen;
	__u32 addr;
};
struct ferrum_ipcache_value {
	__u32 tunnel_endpoint; /* 0 = reachable without a tunnel */
	__u8 kind;
	__u8 pad;
	__u16 flags;
};
#define FERRUM_IPCACHE_VALUE_SIZE 8
enum ferrum_peer_kind {
	FERRUM_KIND_LOCAL_NODE = 1,
	FERRUM_KIND_REMOTE_NODE = 2,
	FERRUM_KIND_REMOTE_POD_BLOCK = 3,
	FERRUM_KIND_LOCAL_POD_BLOCK = 4,
};

/* NAT tables. Forward key: (proto, pod addr/port, remote addr/port). Reverse key:
 * (proto, remote addr/port, node addr/nat port). For ICMP echo the "port" on the pod/node
 * side is the echo identifier and the remote port is 0. */
struct ferrum_nat_key {
	__u32 addr_a;
	__u32 addr_b;
	__u16 port_a;
	__u16 port_b;
	__u8 proto;
	__u8 pad[3];
};
#define FERRUM_NAT_KEY_SIZE 16
struct ferrum_nat_value {
	__u32 addr;
	__u16 port;
	__u16 flags; /* FERRUM_NAT_* (reverse entries) */
	__u64 last_ns; /* last packet seen (coarse monotonic clock) */
};
/* The remote side has answered (TCP: the entry lives as long as an established connection). */
#define FERRUM_NAT_REPLIED (1U << 0)
/* A FIN or RST was seen: the port is free again soon after the last packet. */
#define FERRUM_NAT_CLOSING (1U << 1)
#define FERRUM_NAT_VALUE_SIZE 16

/* IPv4 fragment tracking: only a datagram's first fragment carries its transport header, so
 * what the first one's parse found (ports, ICMP type) is kept for the later ones under the
 * datagram's identity: source, destination, IP id, protocol. */
struct ferrum_frag_key {
	__u32 saddr;
	__u32 daddr;
	__u16 id;
	__u8 proto;
	__u8 pad;
};
#define FERRUM_FRAG_KEY_SIZE 12

struct ferrum_frag_value {
	__u16 sport;
	__u16 dport;
	__u8 has_ports;
	__u8 icmp_type;
	__u8 pad[2];
};
#define FERRUM_FRAG_VALUE_SIZE 8

/* ferrum_events: ring buffer records. */
struct ferrum_event {
	__u64 ts_ns;
	__u8 kind; /* 1 drop, 2 trace */
	__u8 reason; /* drop reason or observation point */
	__u8 proto;
	__u8 tcp_flags; /* TCP header flags byte (FIN 0x01 SYN 0x02 RST 0x04 PSH 0x08 ACK 0x10) */
	__u32 ifindex;
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u32 tunnel_endpoint;
	__u32 nat_addr;
	__u16 nat_port;
	__u8 ev_flags; /* FERRUM_EVF_* */
	__u8 icmp_type;
	/* Context from the policy and service stages for observability; 0 = none. */
	__u32 rule_id; /* the policy rule that decided */
	__u32 service_id; /* the Service frontend a translated packet went through */
};
#define FERRUM_EVENT_SIZE 48
#define FERRUM_EVF_REPLY (1U << 0) /* the packet is a reply of a tracked connection */

/* ferrum_flow_agg: per-CPU, direct-mapped cache of the last trace event per (flow, point);
 * a collision only costs an extra event. */
struct ferrum_flow_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 point;
	__u16 pad;
};
#define FERRUM_FLOW_KEY_SIZE 16
struct ferrum_flow_slot {
	struct ferrum_flow_key key;
	__u64 last_ns;
};
#define FERRUM_FLOW_SLOT_SIZE 24
#define FERRUM_FLOW_AGG_SLOTS 4096 /* power of two */

#define FERRUM_EVENT_DROP 1
#define FERRUM_EVENT_TRACE 2

/* Stable reason codes (Rust: Reason::code). Drops below 64, observation points from 64. */
enum ferrum_reason {
	FERRUM_DROP_SPOOFED_IP = 1,
	FERRUM_DROP_SPOOFED_MAC = 2,
	FERRUM_DROP_UNSUPPORTED_L3 = 3,
	FERRUM_DROP_UNKNOWN_ENDPOINT = 4,
	FERRUM_DROP_NO_TUNNEL_ENDPOINT = 5,
	FERRUM_DROP_NAT_NO_PORT = 6,
	FERRUM_DROP_MALFORMED = 7,
	FERRUM_DROP_ENCAP_FAILED = 8,
	FERRUM_DROP_REWRITE_FAILED = 9,
	/* Service load balancing (codes 20..29). */
	FERRUM_DROP_NO_BACKEND = 20, /* answered with ICMP port unreachable */
	FERRUM_DROP_LB_SOURCE_DENIED = 21, /* not in loadBalancerSourceRanges */
	/* NetworkPolicy (codes 30..39); the event's rule_id names the isolating policy. */
	FERRUM_DROP_POLICY_EGRESS = 30,
	FERRUM_DROP_POLICY_INGRESS = 31,

	FERRUM_TRACE_TO_ENDPOINT = 64,
	FERRUM_TRACE_TO_OVERLAY = 65,
	FERRUM_TRACE_TO_STACK = 66,
	FERRUM_TRACE_FROM_OVERLAY = 67,
	FERRUM_TRACE_SNAT = 68,
	FERRUM_TRACE_REV_SNAT = 69,
	FERRUM_TRACE_LB_DNAT = 80,
	FERRUM_TRACE_LB_REV_DNAT = 81,
};

/* Service load balancer. A frontend is (address, port, protocol, scope); its backends live in
 * ferrum_lb_backends under (frontend id, slot 1..count). */
#define FERRUM_LB_SCOPE_INTERNAL 0
#define FERRUM_LB_SCOPE_EXTERNAL 1
struct ferrum_lb_key {
	__u32 addr;
	__u16 port;
	__u8 proto;
	__u8 scope;
};
#define FERRUM_LB_KEY_SIZE 8
struct ferrum_lb_service {
	__u32 id;
	__u16 count; /* backends in slots 1..count; 0 = reject new flows */
	__u8 flags;
	__u8 algorithm;
	__u32 affinity_timeout; /* seconds; 0 = no session affinity */
	__u32 pad;
};
#define FERRUM_LB_SERVICE_SIZE 16
#define FERRUM_LB_FLAG_MASQUERADE (1U << 0)
#define FERRUM_LB_FLAG_SOURCE_RANGES (1U << 1)
#define FERRUM_LB_ALGO_RANDOM 0
#define FERRUM_LB_ALGO_MAGLEV 1
struct ferrum_lb_backend_key {
	__u32 id;
	__u32 slot;
};
#define FERRUM_LB_BACKEND_KEY_SIZE 8
struct ferrum_lb_backend {
	__u32 addr;
	__u16 port;
	__u16 pad;
};
#define FERRUM_LB_BACKEND_SIZE 8
/* Connection tracking of balanced flows. Forward key (struct ferrum_nat_key): client addr,
 * frontend addr, client port, frontend port, proto. Reverse key: backend addr, client addr
 * as the backend sees it, backend port, client port, proto. */
struct ferrum_lb_ct {
	__u32 backend_addr;
	__u16 backend_port;
	__u16 snat_port; /* with snat_addr: the client's port replaced by this one */
	__u32 id; /* frontend id */
	__u32 snat_addr; /* client address replaced by this one (hairpin, masquerade), 0 if none */
};
#define FERRUM_LB_CT_SIZE 16
struct ferrum_lb_rev {
	__u32 frontend_addr;
	__u16 frontend_port;
	__u16 client_port; /* with client_addr */
	__u32 client_addr; /* restore as destination when the client was SNAT'd, else 0 */
	__u32 flags;
};
/* The client is outside the cluster: replies leave through the uplink. */
#define FERRUM_LB_REV_EXTERNAL (1U << 0)
#define FERRUM_LB_REV_SIZE 16
/* Maglev lookup tables, FERRUM_MAGLEV_SIZE entries per frontend stored in chunks of 64
 * backend slots (crates/lb/src/maglev.rs builds them). */
#define FERRUM_MAGLEV_SIZE 32749
#define FERRUM_MAGLEV_CHUNK 64
struct ferrum_lb_maglev_key {
	__u32 id;
	__u32 chunk;
};
struct ferrum_lb_maglev_chunk {
	__u16 slots[FERRUM_MAGLEV_CHUNK];
};
#define FERRUM_LB_MAGLEV_VALUE_SIZE 128
/* sessionAffinity ClientIP: (frontend id, client address) -> backend, last use. */
struct ferrum_lb_affinity_key {
	__u32 id;
	__u32 client;
};
struct ferrum_lb_affinity {
	__u32 backend_addr;
	__u16 backend_port;
	__u16 pad;
	__u64 last_ns;
};
#define FERRUM_LB_AFFINITY_SIZE 16
/* loadBalancerSourceRanges: LPM key over (frontend id, source address); prefixlen counts the
 * 32 bits of the id plus the range's length. */
struct ferrum_lb_range_key {
	__u32 prefixlen;
	__u32 id; /* network order, so the LPM compares it bytewise first */
	__u32 addr;
};

/* Socket-level load balancing of unconnected UDP: the reply's source is rewritten back to
 * the frontend on recvmsg. Key: socket cookie + backend; value: frontend. */
struct ferrum_lb_sock_key {
	__u64 cookie;
	__u32 addr;
	__u16 port;
	__u16 pad;
};
struct ferrum_lb_sock_rev {
	__u32 frontend_addr;
	__u16 frontend_port;
	__u16 pad;
};

/* ---- NetworkPolicy (crates/policy/src/lower.rs writes these maps) ---- */

/* Identities the datapath knows without the agent (crates/policy/src/identity.rs). */
#define FERRUM_ID_ANY 0
#define FERRUM_ID_HOST 1
#define FERRUM_ID_WORLD 2
#define FERRUM_POLICY_INGRESS 0
#define FERRUM_POLICY_EGRESS 1

/* ferrum_pol_endpoints: local pod address -> rule id of the policy isolating it per direction
 * (0: not isolated, everything allowed). */
struct ferrum_pol_endpoint {
	__u32 ingress_deny_rule;
	__u32 egress_deny_rule;
};
/* ferrum_pol_ipcache: address -> security identity; no match means FERRUM_ID_WORLD. */
/* ferrum_pol_cidr: (endpoint, direction, peer address) LPM -> the ipBlock class of the peer;
 * prefixlen counts the 40 bits of endpoint and direction plus the block's length. */
struct ferrum_pol_cidr_key {
	__u32 prefixlen;
	__u32 endpoint;
	__u8 direction;
	__u8 addr[4];
} __attribute__((packed));
#define FERRUM_POL_CIDR_KEY_SIZE 13
/* ferrum_policy: (endpoint, direction, peer identity or class, protocol, port) LPM -> the
 * allowing rule id. Every entry allows; "any port" entries are shorter prefixes. Entries of
 * 72, 80 and 96 bits are kept in the hash ferrum_policy_exact instead (see ferrum.c). */
struct ferrum_policy_key {
	__u32 prefixlen;
	__u32 endpoint;
	__u8 direction;
	__u8 peer[4]; /* identity, network order */
	__u8 proto;
	__u16 port;
} __attribute__((packed));
#define FERRUM_POLICY_KEY_SIZE 16
/* The same without prefixlen: the key of ferrum_policy_exact. */
struct ferrum_policy_data {
	__u32 endpoint;
	__u8 direction;
	__u8 peer[4];
	__u8 proto;
	__u16 port;
} __attribute__((packed));
#define FERRUM_POLICY_KEY_BITS 96

/* ferrum_pol_ct: connections the policy stage let through, keyed by the 5-tuple normalized so
 * that both directions find the same entry (struct ferrum_nat_key, the lower address/port
 * pair first). */
struct ferrum_pol_ct {
	__u64 last_ns;
	__u32 initiator; /* the address judged as the source (before hairpin or masquerade SNAT) */
	__u32 gen; /* ferrum_config.policy_gen when it was judged */
	__u32 rule_id; /* the rule that allowed it, or with DENIED the isolating policy */
	__u8 flags;
	__u8 reason; /* with DENIED: the drop reason */
	__u16 pad;
};
#define FERRUM_POL_CT_SIZE 24
#define FERRUM_POL_CT_A_INITIATED (1U << 0) /* the key's a side opened the connection */
#define FERRUM_POL_CT_CLOSING (1U << 1) /* TCP FIN or RST seen */
#define FERRUM_POL_CT_DENIED (1U << 2) /* judged again under a new policy and denied */
/* Idle lifetimes. */
#define FERRUM_POL_CT_TCP_NS (6ULL * 3600 * 1000000000ULL)
#define FERRUM_POL_CT_CLOSING_NS (10ULL * 1000000000ULL)
#define FERRUM_POL_CT_OTHER_NS (60ULL * 1000000000ULL)
#define FERRUM_POL_CT_REFRESH_NS 1000000000ULL

/* The source a pod sees when it reaches itself through a Service (it would drop its own
 * address as a source). */
#define FERRUM_HAIRPIN_ADDR_HOST 0xa9fe2a01 /* 169.254.42.1, host order */

#endif

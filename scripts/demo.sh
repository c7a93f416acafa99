#!/usr/bin/env bash
# The lab demo: brings up a two-node Ferrum lab and walks through what works today, then leaves
# the lab running for you to explore. Needs root (network namespaces, BPF).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "the demo needs root (network namespaces, BPF)" >&2; exit 1; }
scripts/install-deps.sh
# The test suite runs this script with the binaries it has just built first on PATH (a test
# cannot run cargo itself).
if [ -z "${FERRUM_DEMO_SKIP_BUILD:-}" ]; then
  cargo build --workspace --bins
  export PATH="$PWD/target/debug:$PATH"
fi
bin_dir=$(dirname "$(command -v ferrum)")
# The lab's name (the test suite picks its own); the VNet step's short-lived lab is vnet<name>.
lab=${FERRUM_DEMO_LAB:-demo}
vlab=vnet$lab
export FERRUM_LAB=$lab

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# Echo a command the way you would type it (arguments with spaces or shell syntax quoted), then run it.
run() {
  local shown='$' a
  for a in "$@"; do
    if [[ $a =~ [[:space:]\|\&\;\$] ]]; then shown+=" '$a'"; else shown+=" $a"; fi
  done
  printf '%s\n' "$shown"
  "$@"
}

step "A fresh lab: a fabric (the cloud network), two nodes with one agent each, an external host"
ferrum lab down >/dev/null 2>&1 || true
run ferrum lab up --nodes 2
run ferrum lab status

step "Pods: each node hands out addresses from its own /24 of the pod CIDR 10.244.0.0/16"
run ferrum apply -f examples/demo-pods.yaml
run ferrum get pods -n demo -o wide
pod_ip() { ferrum get pods -n demo -o json | python3 -c "import json,sys; print([p['status']['podIP'] for p in json.load(sys.stdin)['items'] if p['metadata']['name']=='$1'][0])"; }
web0=$(pod_ip web-0); web1=$(pod_ip web-1)

step "Same node: client -> web-0 is redirected veth to veth by from_pod (bpf_redirect_peer)"
run ferrum exec -n demo client -- nc -w 3 "$web0" 80

step "Across nodes: client (node-0) -> web-1 (node-1) goes through VXLAN, tunnel key from the ipcache"
run ferrum exec -n demo client -- nc -w 3 "$web1" 80
run ferrum exec -n demo client -- sh -c "echo hi | nc -u -w 1 $web1 53"

step "Leaving the cluster: the external host sees the node's IP (BPF SNAT on the uplink, no iptables)"
ext=$(ferrum lab status -o json | python3 -c "import json,sys; s=json.load(sys.stdin); print(s['external']['netns'], s['external']['ip'])")
ext_ns=${ext% *}; ext_ip=${ext#* }
nsenter --net="/run/netns/$ext_ns" sh -c "nc -n -v -l -p 8080 -s $ext_ip -w 5 </dev/null" 2>&1 | sed 's/^/  external host: /' &
sleep 0.5
run ferrum exec -n demo client -- sh -c "echo hello from client | nc -w 2 $ext_ip 8080" || true
wait

step "Anti-spoofing: a pod sending from an address that is not its own is dropped in from_pod"
run ferrum exec -n demo client -- sh -c "ip addr add 10.244.0.200/32 dev eth0 && nc -w 1 -s 10.244.0.200 $web0 80; echo exit=\$?" || true
echo "The node's agent logged the drop with its reason:"
node0_log=/var/lib/ferrum/labs/$lab/nodes/node-0/agent.log
grep -i 'drop' "$node0_log" | tail -n 3 || true

step "Flows, on by default: every node records them; ferrum observe merges all nodes by time"
run ferrum observe --from-pod demo/client --last 8
run ferrum observe --verdict DROPPED -o table --last 3
echo "Each agent serves Prometheus metrics and the web service map on its node IP, port 9962:"
node0_ns=$(ferrum lab status -o json | python3 -c "import json,sys; n=json.load(sys.stdin)['nodes'][0]; print(n['netns'], n['metrics'])")
metrics_url=${node0_ns#* }
hostport=${metrics_url#http://}; hostport=${hostport%%/*}
nsenter --net="/run/netns/${node0_ns% *}" bash -c "exec 3<>/dev/tcp/${hostport%:*}/${hostport#*:}; printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3; cat <&3" \
  | grep -E '^ferrum_(drops_total|flows_processed_total)' | sed 's/^/  /' || true

step "Services without kube-proxy: the lab allocates clusterIPs and keeps EndpointSlices from pod readiness"
run ferrum apply -f examples/demo-services.yaml
run ferrum get services -n demo -o wide
svc_field() { ferrum get services -n demo -o json | python3 -c "import json,sys; s=[s for s in json.load(sys.stdin)['items'] if s['metadata']['name']=='$1'][0]; print($2)"; }
vip=$(svc_field web "s['spec']['clusterIP']")
echo "from_pod translates each new connection to a random backend (conntrack keeps it there):"
for i in 1 2 3 4 5 6; do ferrum exec -n demo client -- nc -w 3 "$vip" 80; done | sort | uniq -c
run ferrum exec -n demo client -- sh -c "echo hi | nc -u -w 1 $vip 53"
run ferrum service trace --from demo/client --to "$vip:80"

step "No backend: the client is refused at once (ICMP port unreachable from the datapath), not left to time out"
nobody=$(svc_field nobody "s['spec']['clusterIP']")
run ferrum exec -n demo client -- sh -c "time nc -w 5 $nobody 80; echo exit=\$?" || true

step "From the external host: a LoadBalancer address, externalTrafficPolicy=Local keeps the client's IP"
lb=$(svc_field web-public "s['status']['loadBalancer']['ingress'][0]['ip']")
for i in 1 2 3 4; do nsenter --net="/run/netns/$ext_ns" nc -w 3 "$lb" 80; done | sort | uniq -c
run ferrum service trace --from "$ext_ip" --to "$lb:80"
step "NetworkPolicy, enforced in eBPF and explained: web pods take TCP 80 from the client only"
run ferrum apply -f examples/demo-policy.yaml
run ferrum policy trace --from demo/client --to demo/web-1 --port 80
run ferrum exec -n demo client -- nc -w 3 "$web1" 80
run ferrum policy trace --from demo/client --to demo/web-1 --port 53 --protocol udp || true
run ferrum exec -n demo client -- sh -c "echo hi | nc -u -w 1 $web1 53; echo \"(no answer: dropped)\""
echo "The drop, recorded on web-1's node with the policy that decided it:"
run ferrum observe --verdict DROPPED --to-pod demo/web-1 --last 1 -o json

step "Growing the pod CIDR: lab update expands it; nodes keep their /24s and pods their addresses"
run ferrum lab update --pod-cidr 10.244.0.0/15
run ferrum exec -n demo client -- nc -w 3 "$web1" 80
echo "Shrinking is refused, naming both values:"
run ferrum lab update --pod-cidr 10.244.0.0/17 || true

step "VNet mode (a second, short-lived lab): pod IPs come from a pod subnet in batches of 16, routed by the fabric without VXLAN"
ferrum --name "$vlab" lab down >/dev/null 2>&1 || true
run ferrum --name "$vlab" lab up --nodes 2 --network-plugin-mode vnet --vnet-cidr 10.224.0.0/12 --node-subnet 10.224.0.0/16 --pod-subnet 10.225.0.0/16
run ferrum --name "$vlab" apply -f examples/demo-pods.yaml
run ferrum --name "$vlab" get pods -n demo -o wide
echo "Each node's NodeNetworkConfig: what it asked the lab's cloud for, and what it was given:"
run ferrum --name "$vlab" get nnc -A
vweb1=$(ferrum --name "$vlab" get pods -n demo -o json | python3 -c "import json,sys; print([p['status']['podIP'] for p in json.load(sys.stdin)['items'] if p['metadata']['name']=='web-1'][0])")
run ferrum --name "$vlab" exec -n demo client -- nc -w 3 "$vweb1" 80
vfabric=$(ferrum --name "$vlab" lab status -o json | python3 -c "import json,sys; print(json.load(sys.stdin)['fabric']['netns'])")
echo "The fabric (the cloud network) routes the pod's address to its node, no tunnel:"
run ip -n "$vfabric" route show "$vweb1"
run ferrum --name "$vlab" lab down

step "The lab keeps running. Explore it:"
cat <<TXT
  export PATH=$bin_dir:\$PATH FERRUM_LAB=$lab
  ferrum get pods -A -o wide
  ferrum exec -n demo client -- ping -c 2 $web1
  ferrum lab status -o json
  ferrum observe --follow                       # live flows from every node (Ctrl-C to stop)
  ferrum observe -n demo --verdict DROPPED -o json
  nsenter --net=/run/netns/${node0_ns% *} chromium --headless --no-sandbox --screenshot=/tmp/map.png ${metrics_url%metrics}
                                                # the service map (served on every node)
Remove it with:  ferrum lab down --name $lab
TXT

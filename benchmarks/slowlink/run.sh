#!/usr/bin/env bash
# Time to accuracy over real, shaped links: one torchrun node per network namespace.
#
#   sudo bash benchmarks/slowlink/run.sh            # the full comparison, 100 Mbit/s and 1 Gbit/s
#   sudo bash benchmarks/slowlink/run.sh --quick    # a smoke test of the whole pipeline (~1-2 minutes)
#   sudo bash benchmarks/slowlink/run.sh --probe    # can this machine run it? (exit 0 yes, 3 no, with why)
#
# Topology: a star. A hub namespace holds a bridge; each node namespace has a veth pair into it,
# its end named eth0 with address 10.213.0.(r+1)/24. Both directions of every link are shaped
# with tbf (egress of eth0 = the node's upload, egress of the hub's port = its download), so each
# node has a full-duplex link of the chosen rate; with --delay and where the kernel has netem, a
# netem delay is added on the node side. Every address lives only inside namespaces this script
# creates; the host's interfaces and routes are never touched. On exit (also on failure or Ctrl-C)
# the processes in those namespaces are stopped and the namespaces deleted.
#
# Needs root and iproute2 (ip, tc). Options:
#   --nodes N           nodes, one rank each (default 4)
#   --rates "R ..."     tc rates, one run each (default "100mbit 1gbit")
#   --delay D           one-way delay per link via netem, e.g. 1ms; 0 for none (default 1ms)
#   --methods LIST      methods for train.py (default: all)
#   --out DIR           results, table and plot, logs in DIR/logs (default benchmarks/slowlink/results
#                       with logs in runs/slowlink-logs; --quick: runs/slowlink-quick)
#   --python PATH       the interpreter with torch and ef21 (default .venv/bin/python, else python3)
# Anything after -- goes to train.py (e.g. -- --target 0.96).
set -euo pipefail
cd "$(dirname "$0")/../.."

nodes=4
rates="100mbit 1gbit"
delay=1ms
methods=""
out=""
quick=0
probe=0
python=""
extra=()
# Exits unless option $1 has a value in $2 (set -u alone would only say "$2: unbound variable"); an
# option in its place means the value was forgotten.
need_value() {
  if [ $# -lt 2 ] || [[ "$2" == --* ]]; then echo "run.sh: $1 needs a value (see --help)" >&2; exit 2; fi
}
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) need_value "$@"; nodes="$2"; shift 2 ;;
    --rates) need_value "$@"; rates="$2"; shift 2 ;;
    --delay) need_value "$@"; delay="$2"; shift 2 ;;
    --methods) need_value "$@"; methods="$2"; shift 2 ;;
    --out) need_value "$@"; out="$2"; shift 2 ;;
    --python) need_value "$@"; python="$2"; shift 2 ;;
    --quick) quick=1; shift ;;
    --probe) probe=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
python=$(command -v "$python" || echo "$python")
case "$nodes" in ''|*[!0-9]*) echo "run.sh: --nodes must be a number, got $nodes" >&2; exit 2 ;; esac
if [ "$nodes" -lt 2 ] || [ "$nodes" -gt 200 ]; then
  echo "run.sh: --nodes must be between 2 and 200, got $nodes" >&2; exit 2
fi

# What this machine lacks, in words; empty when it can run the benchmark.
missing=""
if [ "$(id -u)" != 0 ]; then missing="needs root (network namespaces and tc); run it with sudo"; fi
for tool in ip tc; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    missing="${missing:+$missing; }needs '$tool' from iproute2 (apt-get install iproute2)"
  fi
done

# Our namespaces carry this run's pid, so concurrent runs never share one, and cleanup removes only ours.
prefix="ef21sl$$"
hub="${prefix}hub"
subnet=10.213.0
port=29400
namespaces=()
children=()

cleanup() {
  local rc=$? ns pid
  trap - EXIT INT TERM
  for pid in "${children[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for ns in "${namespaces[@]}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null || true; done
  done
  sleep 0.5
  for ns in "${namespaces[@]}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

add_ns() {
  ip netns add "$1"
  namespaces+=("$1")
  ip -n "$1" link set lo up
}

# Rate in Mbit/s from a tc rate (100mbit, 1gbit, 500kbit).
mbit_of() {
  case "$1" in
    *gbit) awk -v r="${1%gbit}" 'BEGIN { print r * 1000 }' ;;
    *mbit) awk -v r="${1%mbit}" 'BEGIN { print r * 1 }' ;;
    *kbit) awk -v r="${1%kbit}" 'BEGIN { print r / 1000 }' ;;
    *) echo "run.sh: rate must end in kbit, mbit or gbit, got $1" >&2; return 2 ;;
  esac
}

# tbf on one device. The bucket holds 1 ms at the rate and at least 64 KiB, because veth hands tbf
# segmentation-offloaded packets of up to 64 KiB; the queue holds 50 ms, enough that gloo's TCP
# streams are not starved by drops.
shape() {
  local ns="$1" dev="$2" rate="$3" netem="$4" mbit burst
  mbit=$(mbit_of "$rate")
  burst=$(awk -v m="$mbit" 'BEGIN { b = m * 125; if (b < 65536) b = 65536; printf "%d", b }')
  tc -n "$ns" qdisc replace dev "$dev" root handle 1: tbf rate "$rate" burst "$burst" latency 50ms
  if [ -n "$netem" ]; then
    tc -n "$ns" qdisc replace dev "$dev" parent 1:1 handle 10: netem delay "$netem"
  fi
}

# Can this kernel delay packets? (netem is a kernel option, missing from some builds.)
netem_works() {
  local ns="$1" dev="$2"
  tc -n "$ns" qdisc add dev "$dev" root handle 1: tbf rate 1gbit burst 65536 latency 50ms 2>/dev/null &&
    tc -n "$ns" qdisc add dev "$dev" parent 1:1 handle 10: netem delay 1ms 2>/dev/null
  local ok=$?
  tc -n "$ns" qdisc del dev "$dev" root 2>/dev/null || true
  return $ok
}

setup() {
  add_ns "$hub"
  ip -n "$hub" link add br0 type bridge
  ip -n "$hub" link set br0 up
  local r ns
  for ((r = 0; r < nodes; r++)); do
    ns="${prefix}n$r"
    add_ns "$ns"
    # Both ends are created inside our namespaces: nothing appears in the host's namespace.
    ip -n "$ns" link add eth0 type veth peer name "p$r" netns "$hub"
    ip -n "$hub" link set "p$r" master br0
    ip -n "$hub" link set "p$r" up
    ip -n "$ns" addr add "$subnet.$((r + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
  done
}

if [ "$probe" = 1 ]; then
  if [ -n "$missing" ]; then echo "run.sh: $missing" >&2; exit 3; fi
  if ! (add_ns "${prefix}probe" 2>/dev/null && ip -n "${prefix}probe" link add eth0 type veth peer name p0 2>/dev/null &&
        tc -n "${prefix}probe" qdisc add dev eth0 root tbf rate 100mbit burst 65536 latency 50ms 2>/dev/null); then
    ip netns del "${prefix}probe" 2>/dev/null || true
    echo "run.sh: cannot create a network namespace with a tbf-shaped veth here (no CAP_SYS_ADMIN/CAP_NET_ADMIN, or no tbf in the kernel)" >&2
    exit 3
  fi
  ip netns del "${prefix}probe"
  echo "run.sh: network namespaces, veth and tbf work here"
  exit 0
fi
if [ -n "$missing" ]; then echo "run.sh: $missing" >&2; exit 3; fi

# Namespaces of a run that was killed outright (SIGKILL skips the trap) would stay forever: remove
# those whose run.sh is gone.
for ns in $(ip netns list 2>/dev/null | awk '{print $1}'); do
  [[ "$ns" =~ ^ef21sl([0-9]+)(hub|probe|n[0-9]+)$ ]] || continue
  kill -0 "${BASH_REMATCH[1]}" 2>/dev/null && continue
  for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  ip netns del "$ns" 2>/dev/null && echo "run.sh: removed $ns, left behind by a run that no longer exists"
done

train_args=()
if [ "$quick" = 1 ]; then
  rates="100mbit"
  out="${out:-runs/slowlink-quick}"
  # A narrower MLP (0.3M parameters) and a few steps per method: the whole pipeline, in about a minute.
  train_args=(--hidden 512 --max-steps 20 --eval-every 10 --target 0.99 --check-mb 2
              --methods "${methods:-dense,fp16,powersgd-r1,ef21-top1}")
else
  if [ -z "$out" ]; then
    out=benchmarks/slowlink/results
    logs=runs/slowlink-logs  # the committed results stay free of logs
  fi
  if [ -n "$methods" ]; then train_args=(--methods "$methods"); fi
fi
logs="${logs:-$out/logs}"
mkdir -p "$out" "$logs"

setup
netem=""
if [ "$delay" != 0 ]; then
  if netem_works "${prefix}n0" eth0; then
    netem="$delay"
  else
    echo "run.sh: this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM); links are rate-shaped without the $delay delay"
  fi
fi
echo "run.sh: $nodes nodes in namespaces ${prefix}n0..$((nodes - 1)), bridged in $hub; load average: $(cut -d' ' -f1-3 /proc/loadavg)"

# Runs train.py once over the current links: one torchrun per namespace, rendezvous at node 0.
# Fails (and stops the others) as soon as one node fails.
launch() {
  local label="$1" mbit="$2" r ns pid rc failed=0
  local -a pids=()
  children=()
  for ((r = 0; r < nodes; r++)); do
    ns="${prefix}n$r"
    : >"$logs/$label-node$r.log"  # emptied before the tail below opens it
    ip netns exec "$ns" env GLOO_SOCKET_IFNAME=eth0 OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 \
      "$python" -m torch.distributed.run --nnodes "$nodes" --node-rank "$r" --nproc-per-node 1 \
        --rdzv-backend c10d --rdzv-endpoint "$subnet.1:$port" --rdzv-id "$prefix-$label" \
        --rdzv-conf "is_host=$([ "$r" = 0 ] && echo 1 || echo 0)" --local-addr "$subnet.$((r + 1))" \
        --max-restarts 0 \
        benchmarks/slowlink/train.py --link "$label" --rate-mbit "$mbit" --delay "${netem:-0}" \
        --out "$out" "${train_args[@]}" "${extra[@]}" >"$logs/$label-node$r.log" 2>&1 &
    pids+=($!)
    children+=($!)
  done
  tail -n +1 -f "$logs/$label-node0.log" --pid "${pids[0]}" 2>/dev/null | grep --line-buffered -v '^W[0-9]' &
  local left=$nodes
  while [ "$left" -gt 0 ]; do
    sleep 1
    left=0
    for r in "${!pids[@]}"; do
      pid="${pids[$r]}"
      [ "$pid" = done ] && continue
      if kill -0 "$pid" 2>/dev/null; then left=$((left + 1)); continue; fi
      rc=0; wait "$pid" || rc=$?
      pids[$r]=done
      if [ "$rc" != 0 ]; then
        echo "run.sh: node $r failed (exit $rc); its log: $logs/$label-node$r.log" >&2
        tail -n 20 "$logs/$label-node$r.log" | grep -v '^W[0-9]' >&2 || true
        failed=1
      fi
    done
    if [ "$failed" = 1 ]; then return 1; fi
  done
  wait 2>/dev/null || true
  children=()
}

start=$SECONDS
for rate in $rates; do
  mbit=$(mbit_of "$rate")
  for ((r = 0; r < nodes; r++)); do
    shape "${prefix}n$r" eth0 "$rate" "$netem"
    shape "$hub" "p$r" "$rate" ""
  done
  echo "run.sh: links shaped to $rate${netem:+ + $netem delay} per direction"
  launch "$rate" "$mbit"
done
"$python" benchmarks/slowlink/report.py "$out" $rates
echo "run.sh: done in $((SECONDS - start)) s; load average: $(cut -d' ' -f1-3 /proc/loadavg)"

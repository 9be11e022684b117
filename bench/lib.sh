# shellcheck shell=bash
# Shared helpers of the bench/ scripts (sourced, not run).
#
# Every namespace a benchmark makes is named ovlb-<pid>-<role>, <pid> being the
# benchmark's own process id, and is removed by bench_cleanup (EXIT trap, also
# on Ctrl-C and errors). A run that was SIGKILLed leaves namespaces whose <pid>
# no longer runs; the next run sweeps those first (bench_sweep_stale).

readonly BENCH_NS_PREFIX=ovlb
BENCH_ID="${BENCH_NS_PREFIX}-$$"
readonly BENCH_ID

BENCH_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly BENCH_REPO_ROOT

BENCH_NAMESPACES=() # created by this run, in creation order
BENCH_PIDS=()       # background processes started by this run
BENCH_TMP=          # scratch directory (agent state, sockets, logs)
BENCH_CLEANED=0
BENCH_NAME=${BENCH_NAME:-bench}

say() { echo "$BENCH_NAME: $*" >&2; }
warn() { echo "$BENCH_NAME: warning: $*" >&2; }
die() {
	echo "$BENCH_NAME: error: $*" >&2
	exit 1
}

bench_require() {
	[[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces)"
	local tool
	for tool in "$@"; do
		command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found (deploy/setup installs iproute2, iperf3, ping; jq: apt-get install jq)"
	done
}

# Microseconds since the epoch, without forking (bash 5 $EPOCHREALTIME).
now_us() {
	local t=$EPOCHREALTIME
	echo "${t/./}"
}

# ---------------------------------------------------------------- namespaces

ns_name() { echo "${BENCH_ID}-$1"; }

# Creates namespace ovlb-<pid>-ROLE (lo up) and records it for teardown.
ns_add() {
	local ns
	ns=$(ns_name "$1")
	BENCH_NAMESPACES+=("$ns")
	ip netns add "$ns"
	ip -n "$ns" link set lo up
}

ns_kill_members() {
	local pids
	pids=$(ip netns pids "$1" 2>/dev/null | tr '\n' ' ') || true
	[[ -n ${pids// /} ]] || return 0
	# shellcheck disable=SC2086 # a list of pids
	kill -KILL $pids 2>/dev/null || true
}

ns_del() {
	ns_kill_members "$1"
	ip netns del "$1" 2>/dev/null || true
	if [[ -e /run/netns/$1 ]]; then
		umount -l "/run/netns/$1" 2>/dev/null || true
		rm -f "/run/netns/$1" 2>/dev/null || true
	fi
}

# Removes namespaces of earlier benchmark runs whose process is gone.
bench_sweep_stale() {
	local ns pid
	for ns in $(ip netns list 2>/dev/null | awk -v p="^${BENCH_NS_PREFIX}-[0-9]+-" '$1 ~ p { print $1 }'); do
		pid=${ns#"${BENCH_NS_PREFIX}"-}
		pid=${pid%%-*}
		[[ -d /proc/$pid ]] && continue
		warn "removing namespace $ns left by an earlier run (pid $pid is gone)"
		ns_del "$ns"
	done
	for ns in /tmp/"${BENCH_NS_PREFIX}"-*; do
		[[ -d $ns ]] || continue
		pid=${ns#/tmp/"${BENCH_NS_PREFIX}"-}
		pid=${pid%%.*}
		[[ $pid =~ ^[0-9]+$ && ! -d /proc/$pid ]] && rm -rf "$ns"
	done
	return 0
}

# ---------------------------------------------------------------- processes

# Starts "$@" in the background, records its pid; BG_PID holds it.
BG_PID=
bg_start() {
	"$@" &
	BG_PID=$!
	BENCH_PIDS+=("$BG_PID")
}

# Drops PID from the teardown list once it has been reaped (pids get reused).
bg_forget() {
	local keep=() pid
	for pid in "${BENCH_PIDS[@]}"; do
		[[ $pid == "$1" ]] || keep+=("$pid")
	done
	BENCH_PIDS=("${keep[@]}")
}

# SIGTERM, wait up to $2 tenths of a second, SIGKILL; only the given pids.
stop_pids() {
	local waited=0 pid alive
	[[ $# -gt 1 ]] || return 0
	local tenths=$1
	shift
	kill -TERM "$@" 2>/dev/null || true
	while ((waited < tenths)); do
		alive=0
		for pid in "$@"; do
			kill -0 "$pid" 2>/dev/null && alive=1
		done
		[[ $alive -eq 0 ]] && break
		sleep 0.1
		waited=$((waited + 1))
	done
	kill -KILL "$@" 2>/dev/null || true
	for pid in "$@"; do
		wait "$pid" 2>/dev/null || true
	done
}

# ---------------------------------------------------------------- teardown

bench_cleanup() {
	[[ $BENCH_CLEANED -eq 1 ]] && return 0
	BENCH_CLEANED=1
	trap '' INT TERM HUP # a second Ctrl-C must not interrupt the teardown
	local live=() pid i
	for pid in "${BENCH_PIDS[@]}"; do
		kill -0 "$pid" 2>/dev/null && live+=("$pid")
	done
	# Agents first (graceful, 5 s), then whatever else still runs inside.
	stop_pids 50 "${live[@]}"
	for ((i = ${#BENCH_NAMESPACES[@]} - 1; i >= 0; i--)); do
		ns_kill_members "${BENCH_NAMESPACES[i]}"
	done
	for ((i = ${#BENCH_NAMESPACES[@]} - 1; i >= 0; i--)); do
		ns_del "${BENCH_NAMESPACES[i]}"
	done
	if [[ -n $BENCH_TMP && -d $BENCH_TMP ]]; then
		# The agents' network sandboxes (bind mounts under $BENCH_TMP).
		awk -v d="^${BENCH_TMP}/" '$5 ~ d { print $5 }' /proc/self/mountinfo 2>/dev/null |
			while read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done
		if [[ -n ${BENCH_KEEP_LOGS:-} ]]; then
			say "logs kept in $BENCH_TMP"
		else
			rm -rf "$BENCH_TMP"
		fi
	fi
	local left
	left=$(ip netns list 2>/dev/null | awk -v p="^${BENCH_ID}-" '$1 ~ p { print $1 }')
	[[ -z $left ]] || warn "namespaces left after teardown: $left"
}

bench_on_exit() {
	local rc=$?
	bench_cleanup
	exit "$rc"
}

# Installs the teardown traps and makes the scratch directory.
bench_init() {
	trap bench_on_exit EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	trap 'exit 129' HUP
	bench_sweep_stale
	BENCH_TMP=$(mktemp -d "/tmp/${BENCH_ID}.XXXXXX")
}

# ---------------------------------------------------------------- underlay

# Switch namespace with bridge br0, and hosts 1..N: namespace ovlb-<pid>-hK,
# eth0 = $UNDERLAY_NET.(10+K)/24 plugged into br0.
UNDERLAY_NET=${UNDERLAY_NET:-198.18.100}
host_ns() { ns_name "h$1"; }
host_addr() { echo "${UNDERLAY_NET}.$((10 + $1))"; }

make_underlay() {
	local n=$1 k sw hns
	ns_add sw
	sw=$(ns_name sw)
	ip -n "$sw" link add br0 type bridge stp_state 0 forward_delay 0
	ip -n "$sw" link set br0 up
	for ((k = 1; k <= n; k++)); do
		ns_add "h$k"
		hns=$(host_ns "$k")
		ip -n "$hns" link add eth0 type veth peer name "p$k" netns "$sw"
		ip -n "$sw" link set "p$k" master br0 up
		ip -n "$hns" addr add "$(host_addr "$k")/24" dev eth0
		ip -n "$hns" link set eth0 up
	done
}

# ---------------------------------------------------------------- ovl agents

ovl_bin_dir() {
	local d=${OVL_BIN_DIR:-$BENCH_REPO_ROOT/target/release}
	[[ -x $d/ovl-agent && -x $d/ovlctl ]] ||
		die "ovl-agent/ovlctl not found in $d (cargo build --release --workspace --bins, or set OVL_BIN_DIR)"
	(cd "$d" && pwd)
}

OVL_DIR=
OVL_AGENT_PIDS=()
agent_sock() { echo "$BENCH_TMP/h$1.sock"; }
agent_log() { echo "$BENCH_TMP/h$1/agent.log"; }
octl() {
	local k=$1
	shift
	"$OVL_DIR/ovlctl" --socket "$(agent_sock "$k")" "$@"
}

print_agent_logs() {
	local f
	for f in "$BENCH_TMP"/h*/agent.log; do
		[[ -f $f ]] || continue
		echo "----- $f (last 15 lines) -----" >&2
		tail -n 15 "$f" >&2 || true
	done
}

start_agents() {
	local n=$1 k
	OVL_DIR=$(ovl_bin_dir)
	for ((k = 1; k <= n; k++)); do
		mkdir -p "$BENCH_TMP/h$k/state"
		# nsenter, not `ip netns exec`: the agent's sandbox bind mounts
		# must live in this mount namespace (docs/sandbox.md).
		bg_start nsenter --net="/run/netns/$(host_ns "$k")" "$OVL_DIR/ovl-agent" \
			--advertise-addr "$(host_addr "$k")" \
			--state-dir "$BENCH_TMP/h$k/state" \
			--sandbox-dir "$BENCH_TMP/h$k/netns" \
			--socket "$(agent_sock "$k")" \
			--node-name "bench-h$k" \
			--default-address-pool 198.19.0.0/16 \
			</dev/null >>"$(agent_log "$k")" 2>&1
		OVL_AGENT_PIDS+=("$BG_PID")
	done
	local deadline=$((SECONDS + 30)) pending
	while :; do
		pending=0
		for ((k = 1; k <= n; k++)); do
			octl "$k" cluster status >/dev/null 2>&1 && continue
			kill -0 "${OVL_AGENT_PIDS[k - 1]}" 2>/dev/null || {
				print_agent_logs
				die "agent h$k exited during start-up"
			}
			pending=$((pending + 1))
		done
		[[ $pending -eq 0 ]] && return 0
		((SECONDS < deadline)) || {
			print_agent_logs
			die "$pending agent(s) not answering after 30 s"
		}
		sleep 0.1
	done
}

form_cluster() {
	local n=$1 out token k alive deadline
	out=$(octl 1 --format json cluster init) || die "cluster init failed"
	token=$(jq -r .join_token <<<"$out")
	for ((k = 2; k <= n; k++)); do
		octl "$k" cluster join --token "$token" "$(host_addr 1)" >/dev/null || die "cluster join on h$k failed"
	done
	deadline=$((SECONDS + 60))
	while :; do
		alive=$({ octl 1 --format json cluster nodes 2>/dev/null || echo '[]'; } |
			jq '[.[] | select(.status == "alive")] | length')
		[[ $alive -eq $n ]] && return 0
		((SECONDS < deadline)) || {
			print_agent_logs
			die "h1 sees $alive of $n nodes alive after 60 s"
		}
		sleep 0.2
	done
}

# Attaches the existing namespace ROLE (see ns_add; never create it inside a
# command substitution, the teardown list would not see it) to NETWORK on
# host K; prints the endpoint object (JSON).
attach_endpoint() {
	local k=$1 net=$2 role=$3
	octl "$k" --format json endpoint attach "$net" --netns "/run/netns/$(ns_name "$role")" --name "$role"
}

# ---------------------------------------------------------------- statistics

# Median of the numbers on stdin (mean of the middle two for an even count).
median() {
	sort -g | awk '{ v[NR] = $1 } END {
		if (NR == 0) { print "nan"; exit }
		if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# Nearest-rank percentile P (0..100) of the numbers on stdin.
percentile() {
	sort -g | awk -v p="$1" '{ v[NR] = $1 } END {
		if (NR == 0) { print "nan"; exit }
		r = p / 100 * NR; i = int(r); if (i < r) i++; if (i < 1) i = 1
		print v[i] }'
}

#!/usr/bin/env bash
# The Vagrant lab up to the hypervisor line (VMs cannot boot here):
#   1. `vagrant validate --ignore-provider` of deploy/vagrant/Vagrantfile,
#      with VAGRANT_HOME in a temporary folder;
#   2. deploy/vagrant/provision.sh, unchanged, on 3 fresh Debian 12 roots
#      (debootstrap, tests/debian-root.sh), each chrooted into a host network
#      namespace of its own on one bridge, with a shared folder bind-mounted
#      at /vagrant as Vagrant would; vm1 first, then vm2 and vm3, in the
#      order Vagrant provisions. It must end with a 3-node cluster, and vm2
#      and vm3 each ping vm1's container over the demo network.
# The one difference from a VM: no systemd runs in a chroot, so
# provision.sh starts the agent from the unit's ExecStart line instead of
# `systemctl enable --now` (the script's own fallback, printed in its log).
#
#   sudo tests/vagrant-provision.sh [PATH.deb]    default: deploy/package
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_ROOT
# shellcheck source=tests/debian-root.sh
source "$REPO_ROOT/tests/debian-root.sh"

readonly N=3 PREFIX=ovlvg NET=198.18.251
readonly SW_NS=$PREFIX-sw
WORK=$(mktemp -d /var/tmp/ovl-vagrant-test.XXXXXX)
readonly WORK SHARED=$WORK/shared

say() { echo "vagrant-test: $*"; }
die() {
	echo "vagrant-test: FAILED: $*" >&2
	exit 1
}
host_ns() { echo "$PREFIX-h$1"; }
root_of() { echo "$WORK/vm$1"; }
addr() { echo "$NET.$((10 + $1))"; }

cleanup() {
	local rc=$? k pids
	for ((k = 1; k <= N; k++)); do
		if [[ $rc -ne 0 && -s $(root_of "$k")/var/log/ovl-agent.log ]]; then
			echo "vagrant-test: vm$k agent log:" >&2
			tail -30 "$(root_of "$k")/var/log/ovl-agent.log" >&2
		fi
		pids=$(ip netns pids "$(host_ns "$k")" 2>/dev/null || true)
		# shellcheck disable=SC2086 # a list of pids
		[[ -n $pids ]] && kill -TERM $pids 2>/dev/null
	done
	sleep 1
	for ((k = 1; k <= N; k++)); do
		pids=$(ip netns pids "$(host_ns "$k")" 2>/dev/null || true)
		# shellcheck disable=SC2086
		[[ -n $pids ]] && kill -KILL $pids 2>/dev/null
		ip netns del "$(host_ns "$k")" 2>/dev/null || true
		debroot_umount "$(root_of "$k")"
	done
	ip netns del "$SW_NS" 2>/dev/null || true
	rm -rf "$WORK"
	exit "$rc"
}
debroot_test_start cleanup
started=$(date +%s)

say "1. vagrant validate --ignore-provider"
command -v vagrant >/dev/null || die "vagrant not found (deploy/setup installs Debian's vagrant)"
mkdir "$WORK/vagrant-home"
(cd "$REPO_ROOT/deploy/vagrant" && VAGRANT_HOME=$WORK/vagrant-home vagrant validate --ignore-provider) ||
	die "vagrant validate failed"
say "validate took $(($(date +%s) - started)) s"

deb=${1:-$("$REPO_ROOT/deploy/package")}
[[ -s $deb ]] || die "no package at $deb"
# The shared folder: what deploy/vagrant/ holds on a real host (the script
# and the copied package).
mkdir "$SHARED"
cp "$REPO_ROOT/deploy/vagrant/provision.sh" "$deb" "$SHARED/"

say "2. three Debian 12 roots in host namespaces on one bridge"
ip netns add "$SW_NS"
ip -n "$SW_NS" link add br0 type bridge stp_state 0 forward_delay 0
ip -n "$SW_NS" link set br0 up
for ((k = 1; k <= N; k++)); do
	ns=$(host_ns "$k")
	root=$(root_of "$k")
	debroot_make "$root"
	debroot_mount "$root"
	mkdir -p "$root/vagrant"
	mount --bind "$SHARED" "$root/vagrant"
	ip netns add "$ns"
	ip -n "$ns" link set lo up
	ip -n "$ns" link add eth1 type veth peer name "vm$k" netns "$SW_NS"
	ip -n "$SW_NS" link set "vm$k" master br0 up
	ip -n "$ns" addr add "$(addr "$k")/24" dev eth1
	ip -n "$ns" link set eth1 up
done

for ((k = 1; k <= N; k++)); do
	say "provision.sh vm$k $(addr "$k") $(addr 1) (chrooted in $(host_ns "$k"))"
	ip netns exec "$(host_ns "$k")" chroot "$(root_of "$k")" \
		/vagrant/provision.sh "vm$k" "$(addr "$k")" "$(addr 1)" </dev/null ||
		die "provision.sh failed on vm$k"
	cmp -s "$REPO_ROOT/deploy/vagrant/provision.sh" "$SHARED/provision.sh" || die "provision.sh was changed"
done

say "3. vm1 lists $N alive nodes"
alive=0
for _ in $(seq 1 40); do
	nodes=$(ip netns exec "$(host_ns 1)" chroot "$(root_of 1)" ovlctl --format json cluster nodes) || nodes=
	alive=$(grep -o '"status"[[:space:]]*:[[:space:]]*"alive"' <<<"$nodes" | wc -l || true)
	[[ $alive -eq $N ]] && break
	sleep 0.5
done
[[ $alive -eq $N ]] || die "vm1 lists $alive alive node(s), want $N: $nodes"
for ((k = 2; k <= N; k++)); do
	[[ -s $SHARED/.ovl/vm$k.ip ]] || die "vm$k published no container address"
done
say "passed in $(($(date +%s) - started)) s"

#!/usr/bin/env bash
# Provisions one VM of the Vagrant lab (see Vagrantfile and docs/vagrant.md):
#
#   provision.sh NAME ADDR FIRST_ADDR
#
# NAME is the VM (vm1, vm2...), ADDR its private-network address, FIRST_ADDR
# vm1's. It installs the ovl package from the shared folder /vagrant,
# configures the agent with ADDR and starts it. vm1 runs `cluster init`,
# creates the demo network and publishes the join token in /vagrant/.ovl/;
# the others join through vm1. Each VM then attaches one container
# namespace (ovl-demo) to the demo network; every VM after vm1 pings vm1's
# container across the overlay. VMs are provisioned in order (vagrant's
# default), so vm1 is done before vm2 starts.
#
# CI runs this file unchanged in chrooted Debian 12 roots (tests/vagrant-provision.sh).
# There is no systemd there: the agent is then started from the unit's
# ExecStart line (the one branch that differs from a VM).
set -euo pipefail

readonly SHARED=/vagrant
readonly STATE=$SHARED/.ovl
readonly DEMO_NET=demo DEMO_NS=ovl-demo
readonly UNIT=/lib/systemd/system/ovl-agent.service
readonly SOCKET=/run/ovl/ovl.sock

say() { echo "provision[$NAME]: $*"; }
die() {
	echo "provision[$NAME]: error: $*" >&2
	exit 1
}

[[ $# -eq 3 ]] || {
	echo "usage: $0 NAME ADDR FIRST_ADDR" >&2
	exit 2
}
readonly NAME=$1 ADDR=$2 FIRST=$3
[[ $(id -u) -eq 0 ]] || die "must run as root"
export DEBIAN_FRONTEND=noninteractive

# Waits up to $1 seconds for the command after it to succeed.
wait_for() {
	local secs=$1 i
	shift
	for ((i = 0; i < secs * 5; i++)); do
		"$@" >/dev/null 2>&1 && return 0
		sleep 0.2
	done
	return 1
}

install_ovl() {
	local deb
	deb=$(find "$SHARED" -maxdepth 1 -name 'ovl_*.deb' | sort -V | tail -n 1)
	[[ -n $deb ]] || die "no ovl_*.deb in $SHARED: run deploy/package on the host and copy target/debian/ovl_*.deb into deploy/vagrant/"
	say "installing $(basename "$deb")"
	dpkg -i "$deb" >/dev/null
	if ! command -v ip >/dev/null || ! command -v ping >/dev/null; then
		apt-get update -q && apt-get install -y -q --no-install-recommends iproute2 iputils-ping
	fi
}

configure() {
	# The package's commented example stays readable as the dpkg-dist copy.
	cat >/etc/ovl/agent.toml <<TOML
# Written by deploy/vagrant/provision.sh for $NAME.
advertise_addr = "$ADDR"
node_name = "$NAME"
metrics_addr = "127.0.0.1:9946"
TOML
	chmod 600 /etc/ovl/agent.toml
}

start_agent() {
	if [[ -d /run/systemd/system ]]; then
		systemctl enable --now ovl-agent.service
		return
	fi
	local exec_start
	exec_start=$(sed -n 's/^ExecStart=//p' "$UNIT")
	[[ -n $exec_start ]] || die "no ExecStart line in $UNIT"
	say "no systemd here: starting the unit's ExecStart line: $exec_start"
	# shellcheck disable=SC2086 # split into words as systemd does
	setsid $exec_start </dev/null >>/var/log/ovl-agent.log 2>&1 &
}

ctl() { ovlctl --socket "$SOCKET" "$@"; }

form_cluster() {
	wait_for 30 ctl cluster status || die "the agent does not answer on $SOCKET"
	if [[ $NAME == vm1 ]]; then
		if ! ctl cluster nodes >/dev/null 2>&1; then
			ctl cluster init >/dev/null
		fi
		mkdir -p "$STATE"
		(umask 077 && ctl cluster join-token >"$STATE/join-token.part") && mv "$STATE/join-token.part" "$STATE/join-token"
		ctl network inspect "$DEMO_NET" >/dev/null 2>&1 || ctl network create "$DEMO_NET" >/dev/null
		say "cluster initialised, token published in $STATE/join-token"
	else
		wait_for 300 test -s "$STATE/join-token" || die "vm1 published no join token in $STATE"
		if ! ctl cluster nodes >/dev/null 2>&1; then
			ctl cluster join --token-file "$STATE/join-token" "$FIRST" >/dev/null
		fi
		say "joined through $FIRST"
	fi
}

demo_container() {
	local ip
	[[ -e /run/netns/$DEMO_NS ]] || ip netns add "$DEMO_NS"
	ip -n "$DEMO_NS" link set lo up
	# The network reaches a joiner by table sync: retry briefly.
	wait_for 30 ctl endpoint attach "$DEMO_NET" --netns "/run/netns/$DEMO_NS" --name "c-$NAME" ||
		ctl endpoint ls "$DEMO_NET" | grep -q "c-$NAME" || die "attach to $DEMO_NET failed"
	ip=$(ip -n "$DEMO_NS" -4 -o addr show scope global | awk '{ sub("/.*", "", $4); print $4; exit }')
	[[ -n $ip ]] || die "container $DEMO_NS got no address"
	mkdir -p "$STATE"
	echo "$ip" >"$STATE/$NAME.ip"
	say "container $DEMO_NS has $ip on network $DEMO_NET"
}

ping_vm1() {
	[[ $NAME == vm1 ]] && return 0
	local target
	target=$(<"$STATE/vm1.ip")
	say "cross-host ping over the overlay: c-$NAME -> c-vm1 ($target)"
	ip netns exec "$DEMO_NS" ping -n -c 3 -i 0.2 -W 2 "$target" || die "ping from c-$NAME to c-vm1 failed"
}

install_ovl
configure
start_agent
form_cluster
demo_container
ping_vm1
ctl cluster nodes
say "done"

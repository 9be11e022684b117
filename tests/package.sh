#!/usr/bin/env bash
# The Debian package on a fresh Debian 12 root (debootstrap minbase):
#   1. install it with dpkg; the files, conffile, man pages and completions
#      are where Debian puts them; `--version` names a git revision;
#   2. `systemd-analyze verify` of the installed unit prints nothing;
#   3. the agent runs from the root (chrooted, in a network namespace of its
#      own) with the unit's ExecStart line (no systemd in a chroot), forms a
#      one-node cluster and answers ovlctl from the same root;
#   4. purge leaves nothing: the root's file list after purge equals the one
#      before install, apart from dpkg's own logs and bookkeeping.
#
#   sudo tests/package.sh [PATH.deb]     default: builds it with deploy/package
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_ROOT
# shellcheck source=tests/debian-root.sh
source "$REPO_ROOT/tests/debian-root.sh"

readonly NS=ovlpkg-h1 ADDR=198.18.250.1
WORK=$(mktemp -d /var/tmp/ovl-package-test.XXXXXX)
readonly WORK ROOT=$WORK/root LOG=$WORK/agent.log
AGENT_PID=

say() { echo "package-test: $*"; }
die() {
	echo "package-test: FAILED: $*" >&2
	exit 1
}
cleanup() {
	local rc=$?
	if [[ -n $AGENT_PID ]]; then
		kill -TERM "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null || true
	fi
	if [[ $rc -ne 0 && -s $LOG ]]; then
		echo "package-test: agent log:" >&2
		tail -40 "$LOG" >&2
	fi
	ip netns del "$NS" 2>/dev/null || true
	debroot_umount "$ROOT"
	rm -rf "$WORK"
	exit "$rc"
}
debroot_test_start cleanup
started=$(date +%s)
deb=${1:-$("$REPO_ROOT/deploy/package")}
[[ -s $deb ]] || die "no package at $deb"

debroot_make "$ROOT"
# Everything on the root's own file system; /proc, /sys, /dev, /run and /tmp
# are what a booted system mounts or cleans.
file_list() {
	(cd "$ROOT" && find . -xdev \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run -o -path ./tmp \) \
		-prune -o -print | sort)
}
file_list >"$WORK/before"

say "1. dpkg -i $(basename "$deb")"
cp "$deb" "$ROOT/tmp/ovl.deb"
chroot "$ROOT" dpkg -i /tmp/ovl.deb
for f in /usr/bin/ovl-agent /usr/bin/ovlctl /lib/systemd/system/ovl-agent.service \
	/usr/share/man/man8/ovl-agent.8.gz /usr/share/man/man1/ovlctl.1.gz \
	/usr/share/man/man1/ovlctl-network-create.1.gz \
	/usr/share/bash-completion/completions/ovlctl /usr/share/zsh/vendor-completions/_ovlctl \
	/usr/share/fish/vendor_completions.d/ovlctl.fish /usr/share/bash-completion/completions/ovl-agent; do
	[[ -s $ROOT$f ]] || die "package installed no $f"
done
grep -qx /etc/ovl/agent.toml "$ROOT/var/lib/dpkg/info/ovl.conffiles" || die "/etc/ovl/agent.toml is not a conffile"
[[ $(stat -c %a "$ROOT/etc/ovl/agent.toml") == 600 ]] || die "/etc/ovl/agent.toml is not mode 0600"
for bin in ovl-agent ovlctl; do
	v=$(chroot "$ROOT" "$bin" --version)
	say "$v"
	[[ $v =~ ^$bin\ [0-9]+\.[0-9]+\.[0-9]+\ \(git\ ([0-9a-f]{7,}|unknown)\)$ ]] || die "$bin --version: '$v'"
done
v=$(chroot "$ROOT" env CNI_COMMAND=VERSION /usr/lib/cni/ovl </dev/null)
[[ $v == *'"supportedVersions":["1.0.0","1.1.0"]'* ]] || die "/usr/lib/cni/ovl VERSION: '$v'"
say "CNI plugin: $v"
[[ -s $ROOT/usr/share/doc/ovl/examples/ovl.conflist ]] || die "package installed no example conflist"
grep -q 'complete -F _ovlctl' "$ROOT/usr/share/bash-completion/completions/ovlctl" ||
	die "the bash completion does not complete ovlctl"
page=$(zcat "$ROOT/usr/share/man/man1/ovlctl-network-create.1.gz")
[[ $page == *subnet* ]] ||
	die "ovlctl-network-create(1) does not document --subnet"

say "2. systemd-analyze verify, the root's own (stdout and stderr must be empty)"
verify_out=$(chroot "$ROOT" systemd-analyze verify /lib/systemd/system/ovl-agent.service 2>&1) ||
	die "systemd-analyze verify failed: $verify_out"
[[ -z $verify_out ]] || die "systemd-analyze verify printed: $verify_out"

say "3. the agent runs from the root, in namespace $NS"
debroot_mount "$ROOT"
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" addr add "$ADDR/32" dev lo
cat >"$ROOT/etc/ovl/agent.toml" <<TOML
advertise_addr = "$ADDR"
node_name = "pkg1"
TOML
# Not systemd: the unit's own ExecStart line, run in the chroot.
exec_start=$(sed -n 's/^ExecStart=//p' "$ROOT/lib/systemd/system/ovl-agent.service")
[[ -n $exec_start ]] || die "the unit has no ExecStart line"
say "ExecStart: $exec_start"
# shellcheck disable=SC2086 # the ExecStart line is split into words as systemd does
ip netns exec "$NS" chroot "$ROOT" $exec_start </dev/null >"$LOG" 2>&1 &
AGENT_PID=$!
for _ in $(seq 1 100); do
	[[ -S $ROOT/run/ovl/ovl.sock ]] && break
	kill -0 "$AGENT_PID" 2>/dev/null || die "the agent exited"
	sleep 0.1
done
ctl() { ip netns exec "$NS" chroot "$ROOT" ovlctl "$@"; }
ctl cluster init >/dev/null || die "ovlctl cluster init failed"
nodes=$(ctl --format json cluster nodes)
grep -q '"alive"' <<<"$nodes" || die "cluster nodes shows no alive node: $nodes"
ctl cluster nodes
[[ -d $ROOT/var/lib/ovl ]] || die "the agent created no /var/lib/ovl"
kill -TERM "$AGENT_PID"
wait "$AGENT_PID" || die "the agent did not exit cleanly on SIGTERM"
AGENT_PID=
debroot_umount "$ROOT"

say "4. dpkg --purge ovl leaves nothing behind"
printf 'OVL_JOIN_TOKEN=secret\n' >"$ROOT/etc/ovl/agent.env"
chroot "$ROOT" dpkg --purge ovl
rm -f "$ROOT/tmp/ovl.deb"
file_list >"$WORK/after"
# dpkg's own records of what it did: its log, and the status backups
# (their contents, not new paths, differ from before).
left=$(comm -13 "$WORK/before" "$WORK/after" | grep -Ev '^\./var/log/dpkg\.log$' || true)
gone=$(comm -23 "$WORK/before" "$WORK/after" || true)
[[ -z $left ]] || die "purge left behind: $left"
[[ -z $gone ]] || die "install and purge removed: $gone"
say "passed in $(($(date +%s) - started)) s ($(wc -l <"$WORK/before") paths compared)"

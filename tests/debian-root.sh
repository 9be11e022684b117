# shellcheck shell=bash
# Fresh Debian 12 root file systems for the package and provisioning tests
# (sourced by tests/package.sh and tests/vagrant-provision.sh).
#
# `debootstrap --make-tarball` downloads bookworm's minbase packages once per
# run into $OVL_DEBROOT_CACHE (default target/debootstrap/, which a fresh CI
# clone starts without); every root is then made from that tarball with
# `--unpack-tarball`, with no download.
#
# systemd, iproute2, iputils-ping and nftables (the package depends on it)
# are included: a Vagrant box has the first three
# (and `systemd-analyze verify` needs the root's own systemd units), and the
# roots run in host namespaces without Internet access, where the
# provisioning script could not install them.
#
# The first root of a run is unpacked from the tarball and kept as a tar of
# its own (ROOT.tar beside it); later roots are copies of that pristine
# root, seconds instead of minutes of dpkg.

: "${OVL_DEBROOT_CACHE:=$REPO_ROOT/target/debootstrap}"
readonly DEBROOT_SUITE=bookworm
readonly DEBROOT_INCLUDE=systemd,iproute2,iputils-ping,nftables
readonly DEBROOT_TARBALL=$OVL_DEBROOT_CACHE/$DEBROOT_SUITE-minbase-systemd-nft.tgz
readonly DEBROOT_PRISTINE=$OVL_DEBROOT_CACHE/$DEBROOT_SUITE-root-nft.tar

debroot_tarball() {
	command -v debootstrap >/dev/null 2>&1 || {
		echo "debian-root: debootstrap not found (deploy/setup installs it)" >&2
		return 1
	}
	[[ -s $DEBROOT_TARBALL ]] && return 0
	mkdir -p "$OVL_DEBROOT_CACHE"
	local work started
	work=$(mktemp -d "$OVL_DEBROOT_CACHE/make.XXXXXX")
	started=$(date +%s)
	# No mirror argument: debootstrap's default Debian mirror, or
	# $OVL_DEBIAN_MIRROR.
	debootstrap --variant=minbase --include="$DEBROOT_INCLUDE" \
		--make-tarball="$DEBROOT_TARBALL.part" "$DEBROOT_SUITE" "$work" \
		${OVL_DEBIAN_MIRROR:+"$OVL_DEBIAN_MIRROR"} >"$OVL_DEBROOT_CACHE/make.log" 2>&1 || {
		echo "debian-root: debootstrap --make-tarball failed; its log:" >&2
		tail -30 "$OVL_DEBROOT_CACHE/make.log" >&2
		rm -rf "$work" "$DEBROOT_TARBALL.part"
		return 1
	}
	rm -rf "$work"
	mv "$DEBROOT_TARBALL.part" "$DEBROOT_TARBALL"
	echo "debian-root: downloaded $DEBROOT_SUITE minbase into $DEBROOT_TARBALL in $(($(date +%s) - started)) s" >&2
}

# debroot_make DIR: a fresh Debian 12 root in DIR (must not exist).
debroot_make() {
	local dir=$1 started
	started=$(date +%s)
	if [[ -s $DEBROOT_PRISTINE ]]; then
		mkdir "$dir" && tar -C "$dir" --numeric-owner -xpf "$DEBROOT_PRISTINE" || return 1
		echo "debian-root: made $dir from the pristine root in $(($(date +%s) - started)) s" >&2
		return 0
	fi
	debroot_tarball || return 1
	debootstrap --variant=minbase --include="$DEBROOT_INCLUDE" \
		--unpack-tarball="$DEBROOT_TARBALL" "$DEBROOT_SUITE" "$dir" >"$dir.log" 2>&1 || {
		echo "debian-root: debootstrap --unpack-tarball into $dir failed; its log:" >&2
		tail -30 "$dir.log" >&2
		return 1
	}
	rm -f "$dir.log"
	tar -C "$dir" --numeric-owner -cpf "$DEBROOT_PRISTINE.part" . && mv "$DEBROOT_PRISTINE.part" "$DEBROOT_PRISTINE"
	echo "debian-root: made $dir with debootstrap --unpack-tarball in $(($(date +%s) - started)) s" >&2
}

# debroot_mount DIR: DIR itself as a mount point (`ip -n`/`ip netns exec`
# inside need / to be one, as a VM's is), /proc, /sys, /dev and a private
# /run.
debroot_mount() {
	local dir=$1
	mount --bind "$dir" "$dir"
	mount -t proc proc "$dir/proc"
	mount -t sysfs sysfs "$dir/sys"
	mount --rbind /dev "$dir/dev"
	mount --make-rslave "$dir/dev"
	mount -t tmpfs -o mode=755 tmpfs "$dir/run"
}

# debroot_umount DIR: undoes debroot_mount and any mount below DIR (lazy:
# a process still holding one must not keep the test from cleaning up).
debroot_umount() {
	local dir=$1 m
	dir=$(realpath -m "$dir")
	awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r |
		while read -r m; do umount -l "$m" 2>/dev/null || true; done
}

# debroot_test_start CLEANUP: a test's common start: CLEANUP runs on every
# exit (signals included), and root is required.
debroot_test_start() {
	trap "$1" EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	[[ $(id -u) -eq 0 ]] || {
		echo "$0: must run as root (chroot, network namespaces)" >&2
		exit 1
	}
}

#!/bin/bash
# demo-mount.sh IMGFS SOURCE OUT: mounts the image directory SOURCE
# read-only on OUT/mnt, shows the tree, checks that the virtual disk file
# reads the same bytes as `imgfs convert -O raw` writes, and unmounts.
# Without access to /dev/fuse it says so and does nothing.
set -euo pipefail
imgfs=$1 source=$2 out=$3

if [ ! -r /dev/fuse ] || [ ! -w /dev/fuse ]; then
	echo "demo-mount: skipped, /dev/fuse is not available here"
	exit 0
fi
mnt=$out/mnt
mkdir -p "$mnt"
set -x
"$imgfs" mount -o ro "$source" "$mnt"
trap '"$imgfs" umount "$mnt"' EXIT
ls -l "$mnt" "$mnt/disk.qcow2"
cat "$mnt/disk.qcow2/info"
"$imgfs" convert -O raw "$source/disk.qcow2" "$out/disk.raw"
cmp "$mnt/disk.qcow2/disk" "$out/disk.raw"
sha256sum "$mnt/disk.qcow2/disk" "$out/disk.raw"

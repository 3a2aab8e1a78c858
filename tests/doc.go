// Package tests holds imgfs's integration tests. They build the imgfs
// binary once, install it under the name qemu-img in a temporary
// directory, and run it side by side with the real qemu-img 7.2 (and
// qemu-io, which makes the fixtures): the same command line on the same
// image must give the same stdout, stderr and exit code, images written
// by imgfs must pass `qemu-img check` and `qemu-img compare`, and images
// mounted with imgfs must read as qemu-img reads them.
//
// The tests need qemu-img and qemu-io on PATH (Debian's qemu-utils), and
// root with /dev/fuse for the mounts; `make test` installs the packages.
package tests

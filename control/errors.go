package control

import "errors"

// ErrInvalidArgument tags an operation refused because an argument does
// not fit the image or the command (a size that is not positive, a base
// image not in the chain, an unknown format name). The message is
// qemu-img's; the mount turns the tag into EINVAL.
var ErrInvalidArgument = errors.New("invalid argument")

// Package all registers every image format driver; import it for its
// side effect.
package all

import (
	_ "github.com/imgfs/imgfs/formats/bochs"
	_ "github.com/imgfs/imgfs/formats/cloop"
	_ "github.com/imgfs/imgfs/formats/dmg"
	_ "github.com/imgfs/imgfs/formats/luks"
	_ "github.com/imgfs/imgfs/formats/parallels"
	_ "github.com/imgfs/imgfs/formats/qcow"
	_ "github.com/imgfs/imgfs/formats/qcow2"
	_ "github.com/imgfs/imgfs/formats/qed"
	_ "github.com/imgfs/imgfs/formats/raw"
	_ "github.com/imgfs/imgfs/formats/vdi"
	_ "github.com/imgfs/imgfs/formats/vhdx"
	_ "github.com/imgfs/imgfs/formats/vmdk"
	_ "github.com/imgfs/imgfs/formats/vpc"
)

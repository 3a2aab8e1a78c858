package luks

import (
	"crypto/rand"
	"io"
	"math/bits"

	"github.com/imgfs/imgfs/formats"
)

// amendOptions are QEMU's luks amend options (block_crypto_amend_opts_luks)
// without a prefix; qcow2 takes them prefixed with "encrypt.".
var amendOptions = []formats.OptionSpec{
	{Name: "state", Type: formats.OptString, Help: "Select new state of affected keyslots (active/inactive)"},
	{Name: "keyslot", Type: formats.OptNumber, Help: "Select a single keyslot to modify explicitly"},
	{Name: "old-secret", Type: formats.OptString, Help: "Select all keyslots that match this password"},
	{Name: "new-secret", Type: formats.OptString, Help: "New secret to set in the matching keyslots. Empty string to erase"},
	{Name: "iter-time", Type: formats.OptNumber, Help: "Time to spend in PBKDF in milliseconds"},
}

// eraseIterations is how often QEMU overwrites an erased slot's key
// material with random bytes (QCRYPTO_BLOCK_LUKS_ERASE_ITERATIONS).
const eraseIterations = 40

// AmendParams are the keyslot changes `amend` asks for
// (QCryptoBlockAmendOptionsLUKS); the secrets are ids of --object
// secrets.
type AmendParams struct {
	Activate bool // state=active; else state=inactive
	Keyslot  int  // only when HasKeyslot
	OldSecret,
	NewSecret string
	IterTime                                            uint64
	HasKeyslot, HasOldSecret, HasNewSecret, HasIterTime bool
}

// ParseAmendOptions reads the keyslot options named with prefix ("" for
// the luks format, "encrypt." for qcow2), with the messages of QEMU's
// QAPI visitor, which names them without the prefix.
func ParseAmendOptions(o *formats.Options, prefix string) (*AmendParams, error) {
	p := &AmendParams{}
	switch state := o.String(prefix + "state"); {
	case !o.Has(prefix + "state"):
		return nil, formats.Errorf(formats.ErrInvalidOption, "Parameter 'state' is missing")
	case state == "active":
		p.Activate = true
	case state != "inactive":
		return nil, formats.Errorf(formats.ErrInvalidOption, "Parameter 'state' does not accept value '%s'", state)
	}
	if n, ok := o.Uint(prefix + "keyslot"); ok && o.Has(prefix+"keyslot") {
		// QEMU keeps the slot in a C int.
		p.Keyslot, p.HasKeyslot = int(int32(n)), true
	}
	p.OldSecret, p.HasOldSecret = o.String(prefix+"old-secret"), o.Has(prefix+"old-secret")
	p.NewSecret, p.HasNewSecret = o.String(prefix+"new-secret"), o.Has(prefix+"new-secret")
	p.IterTime, p.HasIterTime = o.Uint(prefix + "iter-time")
	p.HasIterTime = p.HasIterTime && o.Has(prefix+"iter-time")
	return p, nil
}

// ReadWriterAt is the region a LUKS header lives in.
type ReadWriterAt interface {
	io.ReaderAt
	io.WriterAt
}

// Amend adds or erases key slots of the header at base in rw, as
// qcrypto_block_luks_amend_options does, with its checks in its order
// and its messages. c is the cipher of the open volume, whose master key
// new slots get; secrets resolves the secret ids; force allows
// overwriting an active slot and erasing the last one.
func (h *Header) Amend(rw ReadWriterAt, base int64, c *SectorCipher, p *AmendParams, secrets map[string][]byte, force bool) error {
	if p.Activate {
		return h.addKeySlot(rw, base, c, p, secrets, force)
	}
	return h.eraseKeySlots(rw, base, p, secrets, force)
}

func (h *Header) activeSlots() int {
	n := 0
	for _, s := range h.Slots {
		if s.Active == slotActive {
			n++
		}
	}
	return n
}

// addKeySlot is qcrypto_block_luks_amend_add_keyslot.
func (h *Header) addKeySlot(rw ReadWriterAt, base int64, c *SectorCipher, p *AmendParams, secrets map[string][]byte, force bool) error {
	if !p.HasNewSecret {
		return formats.Errorf(formats.ErrInvalidOption, "'new-secret' is required to activate a keyslot")
	}
	if p.HasOldSecret {
		return formats.Errorf(formats.ErrInvalidOption, "'old-secret' must not be given when activating keyslots")
	}
	slot := -1
	if p.HasKeyslot {
		if p.Keyslot < 0 || p.Keyslot >= NumSlots {
			// QEMU prints the slot as unsigned here.
			return formats.Errorf(formats.ErrInvalidOption, "Invalid keyslot %d specified, must be between 0 and %d", uint32(p.Keyslot), NumSlots-1)
		}
		slot = p.Keyslot
	} else {
		for i, s := range h.Slots {
			if s.Active != slotActive {
				slot = i
				break
			}
		}
		if slot < 0 {
			return formats.Errorf(formats.ErrInvalidOption, "Can't add a keyslot - all keyslots are in use")
		}
	}
	if !force && h.Slots[slot].Active == slotActive {
		return formats.Errorf(formats.ErrInvalidOption, "Refusing to overwrite active keyslot %d - please erase it first", slot)
	}
	if c == nil {
		return errNoKey
	}
	password, err := lookupSecretData(p.NewSecret, secrets)
	if err != nil {
		return err
	}
	iterTime := uint64(DefaultIterTime)
	if p.HasIterTime {
		iterTime = p.IterTime
	}
	return h.storeKey(rw, base, slot, password, c.key, iterTime)
}

// eraseKeySlots is qcrypto_block_luks_amend_erase_keyslots: one slot by
// index, or every slot the old secret opens.
func (h *Header) eraseKeySlots(rw ReadWriterAt, base int64, p *AmendParams, secrets map[string][]byte, force bool) error {
	bad := func(format string, args ...any) error {
		return formats.Errorf(formats.ErrInvalidOption, format, args...)
	}
	if p.HasNewSecret {
		return bad("'new-secret' must not be given when erasing keyslots")
	}
	if p.HasIterTime {
		return bad("'iter-time' must not be given when erasing keyslots")
	}
	var old []byte
	if p.HasOldSecret {
		var err error
		if old, err = lookupSecretData(p.OldSecret, secrets); err != nil {
			return err
		}
		if err := h.checkDigestIters(); err != nil {
			return err
		}
	}
	switch {
	case p.HasKeyslot:
		i := p.Keyslot
		if i < 0 || i >= NumSlots {
			return bad("Invalid keyslot %d specified, must be between 0 and %d", i, NumSlots-1)
		}
		if p.HasOldSecret {
			mk, err := h.openSlot(rw, base, i, old)
			if err != nil {
				return err
			}
			if mk == nil {
				return bad("Given keyslot %d doesn't contain the given old password for erase operation", i)
			}
		}
		if !force && h.Slots[i].Active != slotActive {
			return bad("Given keyslot %d is already erased (inactive) ", i)
		}
		if !force && h.activeSlots() == 1 {
			return bad("Attempt to erase the only active keyslot %d which will erase all the data in the image irreversibly - refusing operation", i)
		}
		return h.eraseKey(rw, base, i)
	case p.HasOldSecret:
		var match uint8
		for i := range h.Slots {
			mk, err := h.openSlot(rw, base, i, old)
			if err != nil {
				return err
			}
			if mk != nil {
				match |= 1 << i
			}
		}
		if match == 0 {
			return bad("No keyslots match given (old) password for erase operation")
		}
		if !force && bits.OnesCount8(match) == h.activeSlots() {
			return bad("All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation")
		}
		for i := range h.Slots {
			if match&(1<<i) != 0 {
				if err := h.eraseKey(rw, base, i); err != nil {
					return err
				}
			}
		}
		return nil
	}
	return bad("To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given")
}

// eraseKey is qcrypto_block_luks_erase_key: the slot is disabled in the
// header first, then its key material overwritten with random bytes.
func (h *Header) eraseKey(w io.WriterAt, base int64, i int) error {
	slot := &h.Slots[i]
	slot.Salt = [saltLen]byte{}
	slot.Iterations = 0
	slot.Active = slotDisabled
	if err := h.store(w, base); err != nil {
		return err
	}
	garbage := make([]byte, int(h.KeyBytes)*int(slot.Stripes))
	for range eraseIterations {
		rand.Read(garbage)
		if _, err := w.WriteAt(garbage, base+int64(slot.KeyOffset)*SectorSize); err != nil {
			return err
		}
	}
	return nil
}

package formats

// Object is an ordered set of named values, the shape of QAPI structures
// such as a format's info data. Members stay in schema order; renderers
// reorder them as QEMU's QDict does. A Value is one of: bool, int64,
// uint64, float64, string, Object, []any.
type Object []Member

// Member is one named value of an Object.
type Member struct {
	Key   string
	Value any
}

// Get returns the value of key, or nil.
func (o Object) Get(key string) any {
	for _, m := range o {
		if m.Key == key {
			return m.Value
		}
	}
	return nil
}

package main

import (
	"reflect"
	"testing"
)

// TestJSONOptions: json: file names flatten to the keys and values
// QEMU's option parsers see; errors carry qemu-img's words.
func TestJSONOptions(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string // key=value pairs in order
		err  string
	}{
		{`{"driver":"raw","file":{"driver":"file","filename":"a b"}}`, []string{"driver=raw", "file.driver=file", "file.filename=a b"}, ""},
		{`{"offset":1048576,"size":"4M","x":1.5,"y":true,"z":false}`, []string{"offset=1048576", "size=4M", "x=1.5", "y=on", "z=off"}, ""},
		{`{"a":[1,{"b":2}],"n":null}`, []string{"a.0=1", "a.1.b=2", "n="}, ""},
		{`{}`, []string{}, ""},
		{``, nil, "Could not parse the JSON options: Expecting a JSON value"},
		{`[1]`, nil, "Invalid JSON object given"},
		{`"x"`, nil, "Invalid JSON object given"},
		{`{"a":1} {}`, nil, "Could not parse the JSON options: Expecting at most one JSON value"},
		{`{"a":1,"a":2}`, nil, "Could not parse the JSON options: JSON parse error, duplicate key"},
	} {
		kvs, err := jsonOptions(tc.in)
		if tc.err != "" {
			if err == nil || err.Error() != tc.err {
				t.Errorf("%s: error %v, want %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.in, err)
			continue
		}
		got := []string{}
		for _, kv := range kvs {
			got = append(got, kv.key+"="+kv.value)
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: %q, want %q", tc.in, got, tc.want)
		}
	}
	if _, err := jsonOptions(`{"a":`); err == nil {
		t.Error("a truncated object parses")
	}
}

// TestImageOptsName: only the driver's strong options make a json: name,
// in QDict order, with the values as given (typed for json: names).
func TestImageOptsName(t *testing.T) {
	for _, tc := range []struct {
		opts, want string
	}{
		{"driver=qcow2,file.filename=a.qcow2", ""},
		{"driver=qcow2,file.filename=a.qcow2,lazy-refcounts=on,read-only=on,file.locking=off", ""},
		{"driver=raw,offset=1M,size=4M,file.filename=r.raw",
			`json:{"offset": "1M", "driver": "raw", "size": "4M", "file": {"driver": "file", "filename": "r.raw"}}`},
		{"driver=vpc,force_size_calc=chs,force_size_calc=current_size,file.filename=v.vhd",
			`json:{"force_size_calc": "current_size", "driver": "vpc", "file": {"driver": "file", "filename": "v.vhd"}}`},
		{"driver=parallels,prealloc-mode=truncate,file.filename=p.hds", ""},
		{"driver=qcow2,encrypt.key-secret=s0,file.filename=q.qcow2",
			`json:{"encrypt.key-secret": "s0", "driver": "qcow2", "file": {"driver": "file", "filename": "q.qcow2"}}`},
	} {
		kvs, err := parseKeyValues(tc.opts, "file")
		if err != nil {
			t.Fatal(err)
		}
		if got := imageOptsName(kvs); got != tc.want {
			t.Errorf("%s:\n got %s\nwant %s", tc.opts, got, tc.want)
		}
	}
	kvs, err := jsonOptions(`{"driver":"raw","offset":1048576,"file":{"filename":"r.raw"}}`)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := imageOptsName(kvs), `json:{"offset": 1048576, "driver": "raw", "file": {"driver": "file", "filename": "r.raw"}}`; got != want {
		t.Errorf("json: name %s, want %s", got, want)
	}
}

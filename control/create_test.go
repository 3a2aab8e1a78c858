package control

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

func TestPlanCreate(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base")
	if err := createMem(base, 3<<20); err != nil {
		t.Fatal(err)
	}
	name := filepath.Join(dir, "new")
	tests := []struct {
		o       CreateOptions
		want    string // the Formatting line after "fmt=", or the error
		wantErr bool
	}{
		{CreateOptions{Format: "memtest", Size: 1 << 20}, "memtest size=1048576 cluster_size=65536", false},
		{CreateOptions{Format: "memtest", Size: -1, Options: "size=2M"}, "memtest size=2097152 cluster_size=65536", false},
		{CreateOptions{Format: "memtest", Size: 1, Options: "cluster_size=4k"}, "memtest size=1 cluster_size=4096", false},
		// Backing file names print with their commas doubled.
		{CreateOptions{Format: "memtest", Size: 1, BackingFile: "a b,c", BackingFormat: "raw", NoBackingOpen: true},
			"memtest size=1 backing_file=a b,,c backing_fmt=raw cluster_size=65536", false},
		// The size comes from the backing image.
		{CreateOptions{Format: "memtest", Size: -1, BackingFile: "base", BackingFormat: "memtest"},
			"memtest size=3145728 backing_file=base backing_fmt=memtest cluster_size=65536", false},
		{CreateOptions{Format: "nosuch", Size: 1}, "Unknown file format 'nosuch'", true},
		{CreateOptions{Format: "memtest", Size: 1, Options: "foo=bar"}, "Invalid parameter 'foo'", true},
		{CreateOptions{Format: "memtest", Size: 1, Options: "size=2"}, "The image size must be specified only once", true},
		{CreateOptions{Format: "memtest", Size: -1}, "Image creation needs a size parameter", true},
		{CreateOptions{Format: "memtest", Size: -1, BackingFile: "base", BackingFormat: "memtest", NoBackingOpen: true},
			"Image creation needs a size parameter", true},
		{CreateOptions{Format: "memtest", Size: 1, BackingFile: "base"},
			"Backing file specified without backing format\nDetected format of memtest.", true},
		{CreateOptions{Format: "memtest", Size: 1, BackingFile: "base", NoBackingOpen: true},
			"Backing file specified without backing format", true},
		{CreateOptions{Format: "memtest", Size: 1, BackingFile: "nonexist", BackingFormat: "memtest"},
			"Could not open '" + filepath.Join(dir, "nonexist") + "': No such file or directory\nCould not open backing image.", true},
		{CreateOptions{Format: "memtest", Size: 1, BackingFile: name, BackingFormat: "memtest"},
			"Error: Trying to create an image with the same filename as the backing file", true},
		{CreateOptions{Format: "memtest", Size: 1, Options: "backing_file=", BackingFormat: "memtest"},
			"Expected backing file name, got empty string", true},
	}
	for _, tt := range tests {
		tt.o.Filename = name
		plan, err := PlanCreate(tt.o)
		if tt.wantErr {
			if err == nil || err.Error() != tt.want {
				t.Errorf("%+v: got error %v, want %q", tt.o, err, tt.want)
			}
			continue
		}
		if err != nil {
			t.Errorf("%+v: %v", tt.o, err)
			continue
		}
		if got, want := plan.String(), "Formatting '"+name+"', fmt="+tt.want; got != want {
			t.Errorf("got  %q\nwant %q", got, want)
		}
	}
}

func createMem(name string, size int64) error {
	plan, err := PlanCreate(CreateOptions{Filename: name, Format: "memtest", Size: size})
	if err != nil {
		return err
	}
	return plan.Run()
}

func TestCreateTooLarge(t *testing.T) {
	plan, err := PlanCreate(CreateOptions{Filename: filepath.Join(t.TempDir(), "x"), Format: "memtest", Size: 1 << 40})
	if err != nil {
		t.Fatal(err)
	}
	err = plan.Run()
	want := "The image size is too large for file format 'memtest' (try using a larger cluster size)"
	if err == nil || err.Error() != want {
		t.Fatalf("got %v", err)
	}
	var mf *MissingBackingFormatError
	if errors.As(err, &mf) {
		t.Fatal("wrong error type")
	}
}

func TestOptionHelp(t *testing.T) {
	full, err := OptionHelp("memtest", true)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(full, "Supported options:\n") || !strings.Contains(full, "preallocation=") {
		t.Errorf("with a file name the protocol options are listed:\n%s", full)
	}
	short, _ := OptionHelp("memtest", false)
	if !strings.HasPrefix(short, "Supported memtest options:\n") || strings.Contains(short, "preallocation=") ||
		!strings.HasSuffix(short, "\n\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n") {
		t.Errorf("without a file name only the format's options are listed:\n%s", short)
	}
	if _, err := OptionHelp("nosuch", false); err == nil || err.Error() != "Unknown file format 'nosuch'" {
		t.Errorf("got %v", err)
	}
}

package gateway

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"
)

// counterStore is the smallest store a stateFile serves: a number that
// callers raise under its lock and then save.
type counterStore struct {
	file   *stateFile
	mu     sync.Mutex
	n      uint64
	writes int // snapshots taken, i.e. writes tried
	// gate, if set, is called by the snapshot with the lock not held.
	gate func()
}

func newCounterStore(path string) *counterStore {
	s := &counterStore{}
	s.file = &stateFile{path: path, snapshot: func() ([]byte, uint64, error) {
		if s.gate != nil {
			s.gate()
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		s.writes++
		b, err := marshalState(s.n)
		return b, s.n, err
	}}
	return s
}

func (s *counterStore) raise() error {
	s.mu.Lock()
	s.n++
	seq := s.n
	s.mu.Unlock()
	return s.file.save(seq)
}

func readCounter(t *testing.T, path string) uint64 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	if err := json.Unmarshal(b, &n); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return n
}

// Changes saved at once share one write, and each save returns only once
// its change is on disk.
func TestStateFileGroupCommit(t *testing.T) {
	const callers = 50
	path := filepath.Join(t.TempDir(), "counter.json")
	s := newCounterStore(path)
	// The first write waits until every caller has made its change, so it
	// holds them all: the others find their change on disk already.
	deadline := time.Now().Add(10 * time.Second)
	s.gate = func() {
		for time.Now().Before(deadline) {
			s.mu.Lock()
			n := s.n
			s.mu.Unlock()
			if n == callers {
				return
			}
			time.Sleep(time.Millisecond)
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, callers)
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.raise(); err != nil {
				errs <- err
				return
			}
			// Returned: its change is in the file.
			if n := readCounter(t, path); n != callers {
				errs <- os.ErrInvalid
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if s.writes != 1 {
		t.Fatalf("%d changes saved at once took %d writes, want 1", callers, s.writes)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("state file mode: %v %v", fi, err)
	}
}

// A write that fails is an error for each change it was to hold, and the
// next save writes them.
func TestStateFileWriteFails(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "missing")
	path := filepath.Join(dir, "counter.json")
	s := newCounterStore(path)
	for i := range 3 {
		if err := s.raise(); err == nil {
			t.Fatalf("save %d into a missing directory succeeded", i)
		}
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	// Nothing new changed, but the last change is not on disk yet.
	if err := s.file.save(3); err != nil {
		t.Fatal(err)
	}
	if n := readCounter(t, path); n != 3 {
		t.Fatalf("file holds %d, want 3", n)
	}
	before := s.writes
	if err := s.file.save(2); err != nil || s.writes != before {
		t.Fatalf("saving a change already on disk: err %v, %d more writes", err, s.writes-before)
	}
}

// An overlay address is on disk when Get returns it; a pool reopened from
// the file gives every key the same address.
func TestOverlayPoolSaved(t *testing.T) {
	dir := t.TempDir()
	p, err := openOverlayPool(dir)
	if err != nil {
		t.Fatal(err)
	}
	got := make(map[string]string)
	for i := range 20 {
		key := "agent/a" + strconv.Itoa(i)
		a, err := p.Get(key)
		if err != nil {
			t.Fatal(err)
		}
		if prev, ok := got[a.String()]; ok {
			t.Fatalf("%s given to %s and %s", a, prev, key)
		}
		got[a.String()] = key
	}
	q, err := openOverlayPool(dir)
	if err != nil {
		t.Fatal(err)
	}
	for a, key := range got {
		b, ok := q.Peek(key)
		if !ok || b.String() != a {
			t.Fatalf("after reopening, %s has %v (ok %v), want %s", key, b, ok, a)
		}
	}
	// A new key after reopening gets an address no other key has.
	a, err := q.Get("agent/new")
	if err != nil {
		t.Fatal(err)
	}
	if prev, ok := got[a.String()]; ok {
		t.Fatalf("new key got %s, which is %s's", a, prev)
	}
}

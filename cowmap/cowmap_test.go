package cowmap

import (
	"sync"
	"testing"
)

// Writers change the map while readers read it without a lock: every
// read sees a whole version (the race detector checks), and the map ends
// as the writes left it.
func TestMap(t *testing.T) {
	var m Map[int, *int]
	one, two := new(int), new(int)
	if m.Load(1) != nil || m.Snapshot() != nil {
		t.Fatal("zero Map not empty")
	}
	m.Store(1, one)
	m.Store(2, two)
	m.CompareAndDelete(1, two) // not its value: stays
	if m.Load(1) != one || m.Load(2) != two {
		t.Fatal("Store or CompareAndDelete wrong")
	}
	m.CompareAndDelete(1, one)
	m.Delete(2)
	if m.Load(1) != nil || m.Load(2) != nil || len(m.Snapshot()) != 0 {
		t.Fatal("deletes did not take")
	}

	var wg sync.WaitGroup
	stop := make(chan struct{})
	for r := 0; r < 2; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				for k, v := range m.Snapshot() {
					if v == nil || *v != k {
						t.Errorf("read %d -> %v", k, v)
						return
					}
				}
			}
		}()
	}
	for i := 0; i < 500; i++ {
		v := i
		m.Store(i, &v)
		if i%3 == 0 {
			m.Delete(i / 2)
		}
	}
	close(stop)
	wg.Wait()
	// Key k was deleted by the write of i = 2k or 2k+1 if that i is a
	// multiple of 3 (and below 500); every other key stays.
	for k := 0; k < 500; k++ {
		deleted := (2*k < 500 && (2*k)%3 == 0) || (2*k+1 < 500 && (2*k+1)%3 == 0)
		v := m.Load(k)
		if deleted != (v == nil) || (v != nil && *v != k) {
			t.Fatalf("key %d: %v (deleted %v)", k, v, deleted)
		}
	}
}

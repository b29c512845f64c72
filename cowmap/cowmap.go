// Package cowmap is a map for the hot path: read without a lock, through
// an atomic pointer to an immutable map; written by copying (under a
// mutex) and publishing the copy. For tables that every packet reads and
// that change only when a session or a path does.
package cowmap

import (
	"sync"
	"sync/atomic"
)

// Map is a copy-on-write map. The zero value is empty and ready to use.
type Map[K comparable, V comparable] struct {
	mu sync.Mutex // serializes writers
	p  atomic.Pointer[map[K]V]
}

// Load returns the value for k (the zero value if absent); no lock.
func (m *Map[K, V]) Load(k K) V {
	var zero V
	if t := m.p.Load(); t != nil {
		return (*t)[k]
	}
	return zero
}

// Snapshot returns the map as it is now, to read many keys from one
// version; it must not be modified.
func (m *Map[K, V]) Snapshot() map[K]V {
	if t := m.p.Load(); t != nil {
		return *t
	}
	return nil
}

// Store sets k to v.
func (m *Map[K, V]) Store(k K, v V) {
	m.update(func(t map[K]V) bool { t[k] = v; return true })
}

// Delete removes k.
func (m *Map[K, V]) Delete(k K) {
	m.update(func(t map[K]V) bool {
		if _, ok := t[k]; !ok {
			return false
		}
		delete(t, k)
		return true
	})
}

// CompareAndDelete removes k if its value is old.
func (m *Map[K, V]) CompareAndDelete(k K, old V) {
	m.update(func(t map[K]V) bool {
		if v, ok := t[k]; !ok || v != old {
			return false
		}
		delete(t, k)
		return true
	})
}

// update applies change to a copy and publishes it if change reports a
// change.
func (m *Map[K, V]) update(change func(map[K]V) bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	cur := m.Snapshot()
	next := make(map[K]V, len(cur)+1)
	for k, v := range cur {
		next[k] = v
	}
	if change(next) {
		m.p.Store(&next)
	}
}

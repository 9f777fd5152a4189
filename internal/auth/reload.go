package auth

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Reloader keeps the key set current with its key file. It re-reads the file
// when its content changes (checked every interval, so editors' atomic
// renames and Kubernetes' symlink swaps are seen alike) and on Reload, which
// SIGHUP calls. A file that fails to parse, or holds no key, leaves the
// previous keys in force: a broken edit must not open the gateway.
type Reloader struct {
	path   string
	static []Key // from --api-key: always present
	log    *slog.Logger

	set atomic.Pointer[KeySet]

	mu      sync.Mutex // serialises reloads
	sum     [sha256.Size]byte
	failing bool
	hooks   []func(Change)
}

// Change describes one reload, for hooks (closing sockets of removed keys,
// the audit trail).
type Change struct {
	// Err is why the file was not applied; the old keys stay in force.
	Err error
	// Removed lists the keys no longer configured.
	Removed []Key
	// Keys is the number of keys now in force.
	Keys int
}

// NewReloader returns a Reloader for path whose current set is static plus
// initial (the keys read from path at start-up). With an empty path the set
// never changes.
func NewReloader(path string, static, initial []Key, logger *slog.Logger) *Reloader {
	r := &Reloader{path: path, static: static, log: logger}
	r.set.Store(NewKeySet(append(append([]Key(nil), static...), initial...)...))
	if path != "" {
		if b, err := os.ReadFile(path); err == nil {
			r.sum = sha256.Sum256(b)
		}
	}
	return r
}

// KeySet returns the keys in force.
func (r *Reloader) KeySet() *KeySet { return r.set.Load() }

// OnChange registers f to run after every reload attempt that applied a
// change or failed. Register before Watch starts.
func (r *Reloader) OnChange(f func(Change)) { r.hooks = append(r.hooks, f) }

// Reload re-reads the key file now and applies it if its content changed.
func (r *Reloader) Reload() error { return r.reload(true) }

// Watch checks the file every interval until ctx is done.
func (r *Reloader) Watch(ctx context.Context, interval time.Duration) {
	if r.path == "" {
		return
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			r.reload(false)
		}
	}
}

func (r *Reloader) reload(force bool) error {
	c, changed, err := r.apply(force)
	if changed {
		// Hooks run outside r.mu: closing a revoked key's sockets can take
		// a while, and must never hold up the next reload.
		r.notify(c)
	}
	return err
}

// apply reads the file and swaps the key set in; it reports whether hooks
// should hear about it.
func (r *Reloader) apply(force bool) (Change, bool, error) {
	if r.path == "" {
		return Change{}, false, nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	b, err := os.ReadFile(r.path)
	if err != nil {
		return r.fail(fmt.Errorf("reading %s: %w", r.path, err))
	}
	sum := sha256.Sum256(b)
	if sum == r.sum && !force {
		return Change{}, false, nil
	}
	keys, err := ParseKeyFile(bytes.NewReader(b))
	if err == nil && len(keys) == 0 {
		err = errors.New("it holds no key")
	}
	if err != nil {
		r.sum = sum // report a broken file once, not every second
		return r.fail(fmt.Errorf("%s: %w", r.path, err))
	}
	r.sum, r.failing = sum, false
	old := r.set.Load()
	next := NewKeySet(append(append([]Key(nil), r.static...), keys...)...)
	r.set.Store(next)

	var removed []Key
	for _, k := range old.Keys() {
		if !next.Has(k.ID()) {
			removed = append(removed, k)
		}
	}
	names := make([]string, len(removed))
	for i, k := range removed {
		names[i] = k.Name
	}
	r.log.Info("key file reloaded", "file", r.path, "keys", next.Len(), "removed", names)
	return Change{Removed: removed, Keys: next.Len()}, true, nil
}

// fail logs a reload error and keeps the keys; r.mu is held. Hooks hear of
// a failure once, when the file first goes bad.
func (r *Reloader) fail(err error) (Change, bool, error) {
	first := !r.failing
	if first {
		r.log.Error("key file not reloaded; the previous keys stay in force", "err", err)
	}
	r.failing = true
	return Change{Err: err, Keys: r.set.Load().Len()}, first, err
}

func (r *Reloader) notify(c Change) {
	for _, h := range r.hooks {
		h(c)
	}
}

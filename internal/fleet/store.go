package fleet

import (
	"context"
	"sync"
	"time"
)

// Prompt is what the gateway remembers of a prompt it dispatched: where it
// runs, under which id there, and, until it is done, the request that
// queued it, so that it can be queued again elsewhere.
type Prompt struct {
	// ID is the prompt_id the client sees, whichever server runs it.
	ID string
	// Server names the server the prompt is queued on now, and ServerID
	// is its id there (equal to ID on servers that take a client's
	// prompt_id, ComfyUI 0.8 and later).
	Server, ServerID string
	// ClientID is the client_id the prompt was queued with.
	ClientID string
	// Owner identifies the key that queued it ("" without keys).
	Owner string
	// Body is the request body sent to the server (with prompt_id set to
	// ID); nil once the prompt is done.
	Body []byte
	// Models are the model files the prompt loads (for affinity).
	Models []string
	// Done is set when the prompt finished, failed, or was deleted.
	Done bool
	// Created is when the gateway first queued it; Placed is when it was
	// queued on Server; Finished is when the fleet saw it in its server's
	// history (zero: not seen finished).
	Created, Placed, Finished time.Time
	// Moves counts how often it was queued again on another server.
	Moves int
	// Stale are earlier placements that may still hold a copy of the
	// prompt (a server that died with it), to remove when they return.
	Stale []Placement
}

// Placement is a prompt's place on one server.
type Placement struct{ Server, ServerID string }

// Store keeps the fleet's prompt records. The memory store is the default;
// a shared store lets several gateway replicas act as one. Every method
// returns copies: changing a Prompt means Put.
type Store interface {
	// Put adds or replaces the record of p.ID.
	Put(ctx context.Context, p Prompt) error
	// Get returns the record of a client-visible id.
	Get(ctx context.Context, id string) (Prompt, bool, error)
	// ByServerID returns the record of the prompt that server knows as sid,
	// now or in a stale placement.
	ByServerID(ctx context.Context, server, sid string) (Prompt, bool, error)
	// Active returns every record that is not Done.
	Active(ctx context.Context) ([]Prompt, error)
	// FinishedSince returns the records of server's prompts seen finished
	// at or after since.
	FinishedSince(ctx context.Context, server string, since time.Time) ([]Prompt, error)
	// Owned returns the records of the prompts owner queued.
	Owned(ctx context.Context, owner string) ([]Prompt, error)
	// PutFile records who made or uploaded a file.
	PutFile(ctx context.Context, f File, owner string) error
	// FileOwner returns who made or uploaded a file.
	FileOwner(ctx context.Context, f File) (string, bool, error)
}

// File names one file on a ComfyUI server as /view does. Server is ""
// for an upload, which is on every server.
type File struct {
	Server, Type, Subfolder, Filename string
}

// memoryStore is the Store of a single gateway. It keeps every active
// record and the newest maxDone done ones (their id mapping serves
// /history and /view after the prompt finished).
type memoryStore struct {
	mu       sync.Mutex
	byID     map[string]*Prompt
	bySrv    map[Placement]string // placement → ID
	doneFIFO []string
	maxDone  int
	files    map[File]string // → owner
	fileFIFO []File
}

// NewMemoryStore returns a Store in memory that remembers up to maxDone
// finished prompts (0: 100,000).
func NewMemoryStore(maxDone int) Store {
	if maxDone <= 0 {
		maxDone = 100_000
	}
	return &memoryStore{byID: map[string]*Prompt{}, bySrv: map[Placement]string{}, maxDone: maxDone, files: map[File]string{}}
}

func clonePrompt(p Prompt) Prompt {
	p.Body = append([]byte(nil), p.Body...)
	p.Models = append([]string(nil), p.Models...)
	p.Stale = append([]Placement(nil), p.Stale...)
	return p
}

func (s *memoryStore) Put(_ context.Context, p Prompt) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.byID[p.ID]
	c := clonePrompt(p)
	s.byID[p.ID] = &c
	s.bySrv[Placement{p.Server, p.ServerID}] = p.ID
	for _, st := range p.Stale {
		s.bySrv[st] = p.ID
	}
	if p.Done && (old == nil || !old.Done) {
		s.doneFIFO = append(s.doneFIFO, p.ID)
		for len(s.doneFIFO) > s.maxDone {
			s.forget(s.doneFIFO[0])
			s.doneFIFO = s.doneFIFO[1:]
		}
	}
	return nil
}

func (s *memoryStore) forget(id string) {
	p := s.byID[id]
	if p == nil || !p.Done {
		return
	}
	delete(s.byID, id)
	for _, pl := range append(p.Stale, Placement{p.Server, p.ServerID}) {
		if s.bySrv[pl] == id {
			delete(s.bySrv, pl)
		}
	}
}

func (s *memoryStore) Get(_ context.Context, id string) (Prompt, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.byID[id]
	if p == nil {
		return Prompt{}, false, nil
	}
	return clonePrompt(*p), true, nil
}

func (s *memoryStore) ByServerID(_ context.Context, server, sid string) (Prompt, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	id, ok := s.bySrv[Placement{server, sid}]
	if !ok {
		return Prompt{}, false, nil
	}
	p := s.byID[id]
	if p == nil {
		return Prompt{}, false, nil
	}
	return clonePrompt(*p), true, nil
}

func (s *memoryStore) Active(_ context.Context) ([]Prompt, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Prompt
	for _, p := range s.byID {
		if !p.Done {
			out = append(out, clonePrompt(*p))
		}
	}
	return out, nil
}

func (s *memoryStore) Owned(_ context.Context, owner string) ([]Prompt, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Prompt
	for _, p := range s.byID {
		if p.Owner == owner {
			out = append(out, clonePrompt(*p))
		}
	}
	return out, nil
}

// maxFiles bounds the file index; the oldest entries go first (their
// files then become admin-only, like files from before the gateway).
const maxFiles = 1_000_000

func (s *memoryStore) PutFile(_ context.Context, f File, owner string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.files[f]; !ok {
		s.fileFIFO = append(s.fileFIFO, f)
		for len(s.fileFIFO) > maxFiles {
			delete(s.files, s.fileFIFO[0])
			s.fileFIFO = s.fileFIFO[1:]
		}
	}
	s.files[f] = owner
	return nil
}

func (s *memoryStore) FileOwner(_ context.Context, f File) (string, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	o, ok := s.files[f]
	return o, ok, nil
}

func (s *memoryStore) FinishedSince(_ context.Context, server string, since time.Time) ([]Prompt, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Prompt
	for i := len(s.doneFIFO) - 1; i >= 0; i-- {
		p := s.byID[s.doneFIFO[i]]
		if p == nil {
			continue
		}
		if p.Finished.Before(since) && !p.Finished.IsZero() {
			break
		}
		if p.Server == server && !p.Finished.IsZero() {
			out = append(out, clonePrompt(*p))
		}
	}
	return out, nil
}

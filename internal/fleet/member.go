package fleet

import (
	"encoding/json"
	"slices"
	"sync"
	"time"

	"github.com/comfygate/comfygate/internal/upstream"
)

// member is what the fleet knows of one ComfyUI server, from its polls and
// from what the gateway sent it.
type member struct {
	u *upstream.Upstream

	mu sync.Mutex
	// caps is what the server can run (nil until /object_info was read).
	caps *capabilities
	// objectInfo is the server's /object_info answer, for the merged one.
	objectInfo json.RawMessage
	// stats is the server's last /system_stats answer.
	stats json.RawMessage
	// version is system.comfyui_version from stats.
	version string
	// running and pending are the server's own prompt ids in its queue,
	// as of polled.
	running, pending []string
	polled           time.Time
	// reserved counts prompts being queued there (their POST has not
	// returned); placedAt holds when each prompt queued there since the
	// last poll's queue read began was queued (the poll does not show
	// them).
	reserved int
	placedAt []time.Time
	// lastModels are the model files of the last prompt queued there.
	lastModels []string
	// uploads are input files uploaded there through the gateway since
	// its /object_info was read (they are valid combo values).
	uploads map[string]bool
	// fails counts polls failed in a row; wasUp is the health the last
	// tick acted on.
	fails int
	wasUp bool
	// infoAt is when caps was read; infoBusy is set while it is read.
	infoAt   time.Time
	infoBusy bool
}

func newMember(u *upstream.Upstream) *member {
	return &member{u: u, uploads: map[string]bool{}, wasUp: true}
}

// queueLen is the server's queue as the router counts it: what its last
// poll showed plus what was sent since.
func (m *member) queueLen() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.running) + len(m.pending) + m.reserved + len(m.placedAt)
}

// reserve counts a prompt about to be queued on m, with its model files.
func (m *member) reserve(mods []string) {
	m.mu.Lock()
	m.reserved++
	m.lastModels = mods
	m.mu.Unlock()
}

// unreserve takes back a reserve whose prompt was not queued.
func (m *member) unreserve() {
	m.mu.Lock()
	m.reserved = max(m.reserved-1, 0)
	m.mu.Unlock()
}

// placed turns a reserve into a prompt queued on m now.
func (m *member) placed() {
	m.mu.Lock()
	m.reserved = max(m.reserved-1, 0)
	m.placedAt = append(m.placedAt, time.Now())
	m.mu.Unlock()
}

// polledQueue records m's queue as read by a request sent at start: the
// prompts queued before start are in it (or done).
func (m *member) polledQueue(running, pending []string, start time.Time) {
	m.running, m.pending = running, pending
	m.placedAt = slices.DeleteFunc(m.placedAt, func(t time.Time) bool { return t.Before(start) })
}

// ended notes that sid ended on m (its end signal), before the next poll
// shows it.
func (m *member) ended(sid string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := len(m.running) + len(m.pending)
	m.running = slices.DeleteFunc(m.running, func(s string) bool { return s == sid })
	m.pending = slices.DeleteFunc(m.pending, func(s string) bool { return s == sid })
	if len(m.running)+len(m.pending) == n && len(m.placedAt) > 0 {
		m.placedAt = m.placedAt[1:] // queued after the last poll
	}
}

// usable reports whether the server may take new prompts.
func (m *member) usable() bool {
	return m.u.Healthy() && !m.u.Draining()
}

// inQueue reports whether sid is running or pending there, per the last
// poll.
func (m *member) inQueue(sid string) (running, pending bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Contains(m.running, sid), slices.Contains(m.pending, sid)
}

// capabilities is what one server can run: its node classes and, for each
// combo input, the values it accepts (model files above all).
type capabilities struct {
	// classes maps a class_type to its combo inputs' choices.
	classes map[string]map[string]map[string]bool
}

// parseCapabilities reads an /object_info answer.
func parseCapabilities(raw []byte) (*capabilities, error) {
	var info map[string]struct {
		Input struct {
			Required map[string]json.RawMessage `json:"required"`
			Optional map[string]json.RawMessage `json:"optional"`
		} `json:"input"`
	}
	if err := json.Unmarshal(raw, &info); err != nil {
		return nil, err
	}
	c := &capabilities{classes: make(map[string]map[string]map[string]bool, len(info))}
	for class, def := range info {
		combos := map[string]map[string]bool{}
		for _, inputs := range []map[string]json.RawMessage{def.Input.Required, def.Input.Optional} {
			for name, spec := range inputs {
				if choices, ok := comboChoices(spec); ok {
					combos[name] = choices
				}
			}
		}
		c.classes[class] = combos
	}
	return c, nil
}

// comboChoices returns the choices of a combo input's spec: the old form
// [["a", "b"], {...}] or the newer ["COMBO", {"options": ["a", "b"]}].
func comboChoices(spec json.RawMessage) (map[string]bool, bool) {
	var parts []json.RawMessage
	if json.Unmarshal(spec, &parts) != nil || len(parts) == 0 {
		return nil, false
	}
	var list []any
	if json.Unmarshal(parts[0], &list) != nil {
		var typ string
		if json.Unmarshal(parts[0], &typ) != nil || typ != "COMBO" || len(parts) < 2 {
			return nil, false
		}
		var opts struct {
			Options []any `json:"options"`
		}
		if json.Unmarshal(parts[1], &opts) != nil || opts.Options == nil {
			return nil, false
		}
		list = opts.Options
	}
	set := make(map[string]bool, len(list))
	for _, v := range list {
		if s, ok := v.(string); ok {
			set[s] = true
		}
	}
	return set, true
}

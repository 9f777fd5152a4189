package requestlog

import (
	"bytes"
	"strings"
	"sync"
	"testing"
	"time"
)

// syncBuffer is a bytes.Buffer safe for the timer's flush.
type syncBuffer struct {
	mu     sync.Mutex
	b      bytes.Buffer
	writes int
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.writes++
	return s.b.Write(p)
}

func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

func (s *syncBuffer) Writes() int { s.mu.Lock(); defer s.mu.Unlock(); return s.writes }

func TestBufferedWriterBatchesAndFlushesOnTimer(t *testing.T) {
	var out syncBuffer
	w := NewBufferedWriter(&out, 20*time.Millisecond)
	defer w.Close()
	for i := 0; i < 100; i++ {
		w.Write([]byte("line\n"))
	}
	if out.String() != "" {
		t.Fatalf("written before the interval: %q", out.String())
	}
	deadline := time.Now().Add(5 * time.Second)
	for out.String() == "" && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := strings.Count(out.String(), "line\n"); got != 100 {
		t.Fatalf("%d lines after the interval; want 100", got)
	}
	if out.Writes() != 1 {
		t.Errorf("%d writes; want 1", out.Writes())
	}
}

func TestBufferedWriterCloseFlushes(t *testing.T) {
	var out syncBuffer
	w := NewBufferedWriter(&out, time.Hour)
	w.Write([]byte("a\n"))
	w.Write([]byte("b\n"))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if out.String() != "a\nb\n" {
		t.Fatalf("after Close: %q", out.String())
	}
	w.Write([]byte("c\n")) // after Close: straight through
	if out.String() != "a\nb\nc\n" {
		t.Fatalf("write after Close: %q", out.String())
	}
}

func TestBufferedWriterFlushesWhenFull(t *testing.T) {
	var out syncBuffer
	w := NewBufferedWriter(&out, time.Hour)
	defer w.Close()
	line := []byte(strings.Repeat("x", 1023) + "\n")
	for i := 0; i < MaxBuffered/len(line); i++ {
		w.Write(line)
	}
	if len(out.String()) != MaxBuffered {
		t.Fatalf("%d bytes written at %d buffered; want all", len(out.String()), MaxBuffered)
	}
}

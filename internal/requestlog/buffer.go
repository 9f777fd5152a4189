package requestlog

import (
	"io"
	"sync"
	"time"
)

// BufferedWriter collects log lines in memory and writes them out in one
// write at most Interval after the first of them, or as soon as MaxBuffered
// bytes are waiting. One request line per write(2) is a good part of a small
// proxied request's CPU; batching them costs a line at most Interval of
// delay. Close (or Flush) writes out what is waiting: call it before the
// process exits so that no line is lost.
//
// It owns no goroutine: a timer armed by the first buffered write does the
// flush, so an idle writer costs nothing.
type BufferedWriter struct {
	mu       sync.Mutex
	w        io.Writer
	buf      []byte
	interval time.Duration
	timer    *time.Timer
	armed    bool
	closed   bool
}

// MaxBuffered is how many bytes a BufferedWriter holds before it writes them
// out at once.
const MaxBuffered = 64 << 10

// NewBufferedWriter returns a BufferedWriter that writes to w at most
// interval after a line arrives. interval <= 0 means 100 ms.
func NewBufferedWriter(w io.Writer, interval time.Duration) *BufferedWriter {
	if interval <= 0 {
		interval = 100 * time.Millisecond
	}
	b := &BufferedWriter{w: w, interval: interval, buf: make([]byte, 0, 4096)}
	b.timer = time.AfterFunc(time.Hour, func() { b.Flush() })
	b.timer.Stop()
	return b
}

// Write buffers p (one log line: slog handlers write each record in one
// call). After Close it writes p through at once.
func (b *BufferedWriter) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return b.w.Write(p)
	}
	b.buf = append(b.buf, p...)
	if len(b.buf) >= MaxBuffered {
		if err := b.flushLocked(); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	if !b.armed {
		b.armed = true
		b.timer.Reset(b.interval)
	}
	return len(p), nil
}

// Flush writes out whatever is buffered.
func (b *BufferedWriter) Flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.flushLocked()
}

func (b *BufferedWriter) flushLocked() error {
	if b.armed {
		b.timer.Stop()
		b.armed = false
	}
	if len(b.buf) == 0 {
		return nil
	}
	_, err := b.w.Write(b.buf)
	if cap(b.buf) > 4*MaxBuffered {
		b.buf = make([]byte, 0, 4096) // do not keep a burst's buffer forever
	} else {
		b.buf = b.buf[:0]
	}
	return err
}

// Close flushes and makes later writes go straight through. It does not
// close the underlying writer.
func (b *BufferedWriter) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	err := b.flushLocked()
	b.closed = true
	return err
}

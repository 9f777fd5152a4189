package proxy

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
)

// frame builds an unmasked server frame.
func frame(opcode byte, payload []byte) []byte {
	h := []byte{0x80 | opcode}
	switch n := len(payload); {
	case n < 126:
		h = append(h, byte(n))
	case n <= 0xffff:
		h = append(h, 126, 0, 0)
		binary.BigEndian.PutUint16(h[2:], uint16(n))
	default:
		h = append(h, 127, 0, 0, 0, 0, 0, 0, 0, 0)
		binary.BigEndian.PutUint64(h[2:], uint64(n))
	}
	return append(h, payload...)
}

func TestFrameTracker(t *testing.T) {
	masked := []byte{0x81, 0x80 | 3, 1, 2, 3, 4, 'a', 'b', 'c'} // client frames carry a mask key
	stream := bytes.Join([][]byte{
		frame(1, []byte("hi")),
		frame(2, nil),
		frame(2, bytes.Repeat([]byte{7}, 300)),
		frame(2, bytes.Repeat([]byte{8}, 70000)),
		masked,
	}, nil)
	// Feed the stream in every chunk size from 1 byte up; the boundaries
	// found must not depend on how the bytes were split.
	for _, chunk := range []int{1, 2, 3, 7, 13, 100, 4096, len(stream)} {
		var tr frameTracker
		boundaries := 0
		for off := 0; off < len(stream); {
			end := min(off+chunk, len(stream))
			for q := stream[off:end]; len(q) > 0; {
				n, b := tr.advance(q)
				if b {
					boundaries++
				}
				q = q[n:]
			}
			off = end
		}
		if boundaries != 5 || !tr.atBoundary() {
			t.Errorf("chunk %d: %d boundaries, at boundary %v; want 5, true", chunk, boundaries, tr.atBoundary())
		}
	}
}

// TestGoAwayWaitsForFrameEnd pins that the 1001 close frame is written after
// the frame in flight, never inside it.
func TestGoAwayWaitsForFrameEnd(t *testing.T) {
	client, gw := net.Pipe()
	defer client.Close()
	var s streams
	c := &streamConn{Conn: gw, s: &s, done: make(chan struct{})}
	s.add(c)

	payload := bytes.Repeat([]byte("p"), 1000)
	f := frame(2, payload)
	received := make(chan []byte)
	go func() {
		b, _ := io.ReadAll(client)
		received <- b
	}()

	if _, err := c.Write(f[:500]); err != nil { // half a frame is out
		t.Fatal(err)
	}
	closed := make(chan struct{})
	go func() {
		c.goAway(context.Background(), goingAwayFrame)
		close(closed)
	}()
	time.Sleep(50 * time.Millisecond) // goAway is now waiting for the frame to end
	n, err := c.Write(append(f[500:], frame(1, []byte("after"))...))
	if n != len(f)-500 || err == nil {
		t.Errorf("Write while leaving = %d, %v; want the rest of the frame and an error", n, err)
	}
	<-closed
	got := <-received
	want := append(append([]byte(nil), f...), goingAwayFrame...)
	if !bytes.Equal(got, want) {
		t.Errorf("client got %d bytes; want the whole frame then the close frame (%d bytes)", len(got), len(want))
	}
	if code := binary.BigEndian.Uint16(goingAwayFrame[2:4]); code != 1001 {
		t.Errorf("close code %d", code)
	}
	if s.len() != 0 {
		t.Error("connection still registered")
	}
}

// TestGoAwayStalledFrame: a frame that never finishes does not hold shutdown
// for longer than closeGrace.
func TestGoAwayStalledFrame(t *testing.T) {
	client, gw := net.Pipe()
	defer client.Close()
	go io.Copy(io.Discard, client)
	var s streams
	c := &streamConn{Conn: gw, s: &s, done: make(chan struct{})}
	s.add(c)
	c.Write(frame(2, make([]byte, 100))[:50])
	start := time.Now()
	s.closeAll(context.Background(), goingAwayFrame, nil)
	if d := time.Since(start); d > 3*closeGrace {
		t.Errorf("closeAll took %v", d)
	}
	if _, err := c.Write([]byte{1}); err == nil {
		t.Error("write after close succeeded")
	}
}

// TestGoAwayClientNotReading pins a deadlock found in review: a client that
// stops reading held the connection's lock in Write forever, so shutdown
// and key revocation waited forever too.
func TestGoAwayClientNotReading(t *testing.T) {
	client, gw := net.Pipe() // nobody reads client: every Write blocks
	defer client.Close()
	var s streams
	c := &streamConn{Conn: gw, s: &s, done: make(chan struct{})}
	s.add(c)
	blocked := make(chan struct{})
	go func() {
		close(blocked)
		c.Write(frame(2, make([]byte, 1000)))
	}()
	<-blocked
	time.Sleep(50 * time.Millisecond) // the write is now stuck holding c.mu
	done := make(chan struct{})
	go func() {
		s.closeAll(context.Background(), goingAwayFrame, nil)
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * closeGrace):
		t.Fatal("closeAll is stuck behind a client that does not read")
	}
	if s.len() != 0 {
		t.Error("connection still registered")
	}
}

package proxy

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"runtime"
	"sync"
	"testing"
	"time"
)

// BenchmarkIdleWebSocketMemory opens sockets through the proxy to an
// upstream that answers 101 and then stays silent, and reports the memory
// (heap in use plus goroutine stacks, whole process) each idle socket adds.
// Issue 6's target is 10 KB per socket, measured as RSS by bench/run.sh.
func BenchmarkIdleWebSocketMemory(b *testing.B) {
	const n = 500
	up, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer up.Close()
	var mu sync.Mutex
	var upConns []net.Conn
	defer func() {
		mu.Lock()
		for _, c := range upConns {
			c.Close()
		}
		mu.Unlock()
	}()
	go func() {
		for {
			c, err := up.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			upConns = append(upConns, c)
			mu.Unlock()
			go func() {
				br := bufio.NewReader(c)
				if _, err := http.ReadRequest(br); err != nil {
					return
				}
				c.Write([]byte("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"))
			}()
		}
	}()
	p := New(poolOf(b, "http://"+up.Addr().String()), Options{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{Handler: p}
	go srv.Serve(ln)
	defer srv.Close()

	measure := func() uint64 {
		var ms runtime.MemStats
		for range 3 {
			runtime.GC()
		}
		runtime.ReadMemStats(&ms)
		b.Logf("heap in use %d, stacks %d, sys %d, goroutines %d", ms.HeapInuse, ms.StackInuse, ms.Sys, runtime.NumGoroutine())
		return ms.HeapInuse + ms.StackInuse
	}
	for b.Loop() {
		before := measure()
		var clients []net.Conn
		for range n {
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			fmt.Fprintf(c, "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil || resp.StatusCode != 101 {
				b.Fatalf("handshake: %v %v", resp, err)
			}
			clients = append(clients, c)
		}
		time.Sleep(100 * time.Millisecond)
		after := measure()
		b.ReportMetric(float64(after-before)/n, "B/ws")
		for _, c := range clients {
			c.Close()
		}
		for p.OpenStreams() > 0 {
			time.Sleep(10 * time.Millisecond)
		}
	}
}

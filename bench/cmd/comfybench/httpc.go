package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"time"
)

// A minimal HTTP/1.1 keep-alive client. net/http's client costs the load
// generator more CPU than the proxies under test; this one writes a
// prebuilt request and parses only the status line, Content-Length,
// Transfer-Encoding, Connection and one marker header.

type rawConn struct {
	addr string
	c    net.Conn
	br   *bufio.Reader
}

type rawResp struct {
	status  int
	bytes   int64
	sawKey  bool
	headers int
}

func newRawConn(addr string) *rawConn { return &rawConn{addr: addr} }

func (rc *rawConn) close() {
	if rc.c != nil {
		rc.c.Close()
		rc.c = nil
	}
}

func (rc *rawConn) dial() error {
	c, err := net.DialTimeout("tcp", rc.addr, 5*time.Second)
	if err != nil {
		return err
	}
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	rc.c = c
	if rc.br == nil {
		rc.br = bufio.NewReaderSize(c, 64<<10)
	} else {
		rc.br.Reset(c)
	}
	return nil
}

// do sends req (head and body already serialised) and reads the whole
// response. On a stale keep-alive connection it redials once.
func (rc *rawConn) do(req []byte, deadline time.Time) (rawResp, error) {
	for attempt := 0; ; attempt++ {
		fresh := rc.c == nil
		if fresh {
			if err := rc.dial(); err != nil {
				return rawResp{}, err
			}
		}
		rc.c.SetDeadline(deadline)
		resp, err := rc.exchange(req)
		if err == nil {
			return resp, nil
		}
		rc.close()
		if fresh || attempt > 0 {
			return resp, err
		}
	}
}

var errMalformed = errors.New("malformed HTTP response")

func (rc *rawConn) exchange(req []byte) (rawResp, error) {
	var r rawResp
	if _, err := rc.c.Write(req); err != nil {
		return r, err
	}
	line, err := rc.br.ReadSlice('\n')
	if err != nil {
		return r, err
	}
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) {
		return r, errMalformed
	}
	r.status, err = strconv.Atoi(string(line[9:12]))
	if err != nil {
		return r, errMalformed
	}
	clen := int64(-1)
	chunked, closeConn := false, false
	for {
		line, err = rc.br.ReadSlice('\n')
		if err != nil {
			return r, err
		}
		if len(line) <= 2 {
			break
		}
		r.headers++
		i := bytes.IndexByte(line, ':')
		if i < 0 {
			return r, errMalformed
		}
		name, val := line[:i], bytes.TrimSpace(line[i+1:])
		switch {
		case bytes.EqualFold(name, []byte("Content-Length")):
			clen, err = strconv.ParseInt(string(val), 10, 64)
			if err != nil {
				return r, errMalformed
			}
		case bytes.EqualFold(name, []byte("Transfer-Encoding")):
			chunked = bytes.Contains(bytes.ToLower(val), []byte("chunked"))
		case bytes.EqualFold(name, []byte("Connection")):
			closeConn = bytes.EqualFold(val, []byte("close"))
		case bytes.EqualFold(name, []byte("X-Upstream-Saw-Key")):
			r.sawKey = true
		}
	}
	switch {
	case r.status == 101 || r.status == 204 || r.status == 304:
	case chunked:
		r.bytes, err = readChunked(rc.br)
	case clen >= 0:
		r.bytes, err = io.CopyN(io.Discard, rc.br, clen)
	default:
		r.bytes, err = io.Copy(io.Discard, rc.br)
		closeConn = true
	}
	if err != nil {
		return r, err
	}
	if closeConn {
		rc.close()
	}
	return r, nil
}

func readChunked(br *bufio.Reader) (int64, error) {
	var total int64
	for range 1 << 24 {
		line, err := br.ReadSlice('\n')
		if err != nil {
			return total, err
		}
		line = bytes.TrimSpace(line)
		if i := bytes.IndexByte(line, ';'); i >= 0 {
			line = line[:i]
		}
		n, err := strconv.ParseInt(string(line), 16, 64)
		if err != nil {
			return total, errMalformed
		}
		if n == 0 {
			for { // trailers
				line, err := br.ReadSlice('\n')
				if err != nil {
					return total, err
				}
				if len(line) <= 2 {
					return total, nil
				}
			}
		}
		m, err := io.CopyN(io.Discard, br, n)
		total += m
		if err != nil {
			return total, err
		}
		if _, err := br.Discard(2); err != nil {
			return total, err
		}
	}
	return total, errMalformed
}

// buildRequest serialises one request. header lines are "Name: value".
func buildRequest(method, hostport, path string, headers []string, body []byte) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: comfybench\r\nAccept: */*\r\n", method, path, hostport)
	for _, h := range headers {
		b.WriteString(h)
		b.WriteString("\r\n")
	}
	if body != nil {
		fmt.Fprintf(&b, "Content-Type: application/json\r\nContent-Length: %d\r\n", len(body))
	}
	b.WriteString("\r\n")
	b.Write(body)
	return b.Bytes()
}

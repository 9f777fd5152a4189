// Package clientip finds the address of the client behind a request: the
// direct peer, or, when that peer is a trusted proxy, the address it
// reports in X-Forwarded-For.
package clientip

import (
	"net"
	"net/http"
	"net/netip"
	"strings"
)

// Resolver turns a request into its client address.
type Resolver struct {
	trusted []netip.Prefix
}

// New returns a Resolver that believes X-Forwarded-For only from peers in
// trusted. With no trusted prefixes the header is ignored entirely: it is
// whatever the client chose to write.
func New(trusted []netip.Prefix) *Resolver {
	return &Resolver{trusted: trusted}
}

// ParsePrefixes reads CIDRs ("10.0.0.0/8") or single addresses.
func ParsePrefixes(list []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range list {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, err
		}
		out = append(out, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
	}
	return out, nil
}

// Resolve returns the client's address. Walking X-Forwarded-For from the
// right, it skips every hop that is itself a trusted proxy and returns the
// first that is not; a malformed entry stops the walk at the last trusted
// hop, so a client cannot smuggle an address past the proxy.
func (r *Resolver) Resolve(req *http.Request) netip.Addr {
	peer := peerAddr(req.RemoteAddr)
	if !r.isTrusted(peer) {
		return peer
	}
	hops := req.Header.Values("X-Forwarded-For")
	addr := peer
	for i := len(hops) - 1; i >= 0; i-- {
		parts := strings.Split(hops[i], ",")
		for j := len(parts) - 1; j >= 0; j-- {
			a, err := netip.ParseAddr(strings.TrimSpace(parts[j]))
			if err != nil {
				return addr
			}
			a = a.Unmap()
			if !r.isTrusted(a) {
				return a
			}
			addr = a
		}
	}
	return addr
}

// FromTrustedProxy reports whether req's direct peer is a trusted proxy.
func (r *Resolver) FromTrustedProxy(req *http.Request) bool {
	return r.isTrusted(peerAddr(req.RemoteAddr))
}

func (r *Resolver) isTrusted(a netip.Addr) bool {
	for _, p := range r.trusted {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// Block is the range of addresses one client is taken to hold, for counting
// it: the address itself for IPv4, and its /64 for IPv6, since one host
// usually holds a whole /64 and can rotate through it at will.
func Block(a netip.Addr) netip.Prefix {
	a = a.Unmap()
	if a.Is6() {
		p, _ := a.Prefix(64)
		return p
	}
	p, _ := a.Prefix(a.BitLen())
	return p
}

func peerAddr(remote string) netip.Addr {
	host, _, err := net.SplitHostPort(remote)
	if err != nil {
		host = remote
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		return netip.Addr{}
	}
	return a.Unmap()
}

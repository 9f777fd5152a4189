package httpsyntax

import "testing"

func TestIsToken(t *testing.T) {
	tests := []struct {
		in   string
		want bool
	}{
		{"Content-Type", true},
		{"x-api-key", true},
		{"!#$%&'*+-.^_`|~09azAZ", true},
		{"", false},
		{"a b", false},
		{"a:b", false},
		{"a\tb", false},
		{"ä", false},
		{"a\x00", false},
		{"(x)", false},
		{"a/b", false},
	}
	for _, tt := range tests {
		if got := IsToken(tt.in); got != tt.want {
			t.Errorf("IsToken(%q) = %v, want %v", tt.in, got, tt.want)
		}
		if got := IsToken([]byte(tt.in)); got != tt.want {
			t.Errorf("IsToken([]byte(%q)) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func TestTrimOWS(t *testing.T) {
	for in, want := range map[string]string{
		"":            "",
		"  a b \t":    "a b",
		"\t\tclose":   "close",
		"x":           "x",
		" \r\n ":      "\r\n", // only spaces and tabs are whitespace here
		"\t \t":       "",
		" keep-alive": "keep-alive",
	} {
		if got := TrimOWS(in); got != want {
			t.Errorf("TrimOWS(%q) = %q, want %q", in, got, want)
		}
		if got := string(TrimOWS([]byte(in))); got != want {
			t.Errorf("TrimOWS([]byte(%q)) = %q, want %q", in, got, want)
		}
	}
}

func TestEqualFold(t *testing.T) {
	tests := []struct {
		a, b string
		want bool
	}{
		{"close", "Close", true},
		{"CHUNKED", "chunked", true},
		{"keep-alive", "Keep-Alive", true},
		{"close", "closed", false},
		{"k", "K", true},
		{"ſ", "s", false}, // no Unicode folding
		{"@", "`", false}, // neighbours of the letter ranges
		{"[", "{", false},
	}
	for _, tt := range tests {
		if got := EqualFold(tt.a, tt.b); got != tt.want {
			t.Errorf("EqualFold(%q, %q) = %v, want %v", tt.a, tt.b, got, tt.want)
		}
	}
}

func TestListHas(t *testing.T) {
	tests := []struct {
		list, token string
		want        bool
	}{
		{"close", "close", true},
		{"keep-alive, Close", "close", true},
		{" x-secret ,\tUpgrade ", "upgrade", true},
		{"closed", "close", false},
		{"", "close", false},
		{",,", "close", false},
		{"trailers", "trailers", true},
	}
	for _, tt := range tests {
		if got := ListHas(tt.list, tt.token); got != tt.want {
			t.Errorf("ListHas(%q, %q) = %v, want %v", tt.list, tt.token, got, tt.want)
		}
	}
}

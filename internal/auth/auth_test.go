package auth

import (
	"errors"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/comfygate/comfygate/internal/route"
)

const (
	goodKey  = "0123456789abcdef0123456789abcdef"
	otherKey = "fedcba9876543210fedcba9876543210"
)

func TestKeySetLookup(t *testing.T) {
	ks := NewKeySet(NewKey("first", goodKey), NewKey("second", otherKey), NewKey("dup", goodKey))
	tests := []struct {
		candidate string
		wantName  string
		wantOK    bool
	}{
		{goodKey, "first", true},
		{otherKey, "second", true},
		{goodKey[:31], "", false},
		{goodKey + "0", "", false},
		{strings.ToUpper(goodKey), "", false},
		{"", "", false},
		{strings.Repeat("a", maxKeyLen+1), "", false},
	}
	for _, tt := range tests {
		k, ok := ks.Lookup(tt.candidate)
		if name := k.Name; name != tt.wantName || ok != tt.wantOK {
			t.Errorf("Lookup(%.10q…) = %q, %v; want %q, %v", tt.candidate, k.Name, ok, tt.wantName, tt.wantOK)
		}
	}
	if got := ks.Len(); got != 2 {
		t.Errorf("Len() = %d; want 2 (duplicates collapse)", got)
	}
	var empty *KeySet
	if empty.Enabled() {
		t.Error("nil KeySet is enabled")
	}
	if _, ok := empty.Lookup(goodKey); ok {
		t.Error("nil KeySet matched a key")
	}
}

func TestCheckSecret(t *testing.T) {
	tests := []struct {
		secret string
		want   error
	}{
		{goodKey, nil},
		{"short", nil}, // short keys only warn
		{"", ErrEmptyKey},
		{"abc def", ErrKeySpace},
		{"abc\tdef", ErrKeySpace},
		{"abc\x00def", ErrKeyControl},
		{"abc\x7fdef", ErrKeyControl},
		{"abc\ndef", ErrKeyControl},
		{"clé-secrète-très-longue", ErrKeyASCII},
		{strings.Repeat("k", maxKeyLen+1), ErrKeyLong},
	}
	for _, tt := range tests {
		if got := CheckSecret(tt.secret); !errors.Is(got, tt.want) {
			t.Errorf("CheckSecret(%q) = %v; want %v", tt.secret, got, tt.want)
		}
	}
}

func TestParseKeyFile(t *testing.T) {
	type k struct {
		Name  string
		Scope route.Scope
	}
	tests := []struct {
		name     string
		file     string
		want     []k
		wantErrs []string // substrings, one per bad line
	}{
		{"one key from echo", goodKey + "\n", []k{{"key-1", route.ScopeAdmin}}, nil},
		{"no trailing newline", goodKey, []k{{"key-1", route.ScopeAdmin}}, nil},
		{"comments blanks and spaces", "# team keys\n\n  " + goodKey + "  \r\n\t" + otherKey + "\n",
			[]k{{"key-1", route.ScopeAdmin}, {"key-2", route.ScopeAdmin}}, nil},
		{"byte order mark", "\ufeff" + goodKey + "\n", []k{{"key-1", route.ScopeAdmin}}, nil},
		{"named", "alice:" + goodKey + "\n", []k{{"alice", route.ScopeAdmin}}, nil},
		{"named with scope", "render-bot:" + goodKey + " submit\n", []k{{"render-bot", route.ScopeSubmit}}, nil},
		{"hashed with scope", "viewer:sha256:" + HashSecret(goodKey) + " read\n", []k{{"viewer", route.ScopeRead}}, nil},
		{"hashed upper-case hex, scope list", "ops:sha256:" + strings.ToUpper(HashSecret(goodKey)) + "\tread,admin\n", []k{{"ops", route.ScopeAdmin}}, nil},
		{"bare key with scope", goodKey + " read\n", []k{{"key-1", route.ScopeRead}}, nil},
		{"mixed", goodKey + "\nbob:" + otherKey + " read\n", []k{{"key-1", route.ScopeAdmin}, {"bob", route.ScopeRead}}, nil},
		{"every bad line reported", "ok-key-ok-key-ok-key\nbad\x01key\n\nnon-ascii-é\nx:sha256:abc\n:" + goodKey + "\nbad$name:" + otherKey + "\nz:" + goodKey + " write\n",
			nil, []string{"line 2: key contains a control character", "line 4: key contains a non-ASCII",
				"line 5: key \"x\": sha256: must be followed by 64 hex digits", "line 6: key name is empty",
				"line 7: key name may only hold", "line 8: unknown scope (want read, submit or admin)"}},
		{"duplicate name", "a:" + goodKey + "\na:" + otherKey + "\n", nil, []string{`line 2: key name "a" is already used on line 1`}},
		{"duplicate key", "a:" + goodKey + "\nb:sha256:" + HashSecret(goodKey) + "\n", nil, []string{"line 2: the same key is already on line 1"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			keys, err := ParseKeyFile(strings.NewReader(tt.file))
			if len(tt.wantErrs) > 0 {
				if err == nil {
					t.Fatalf("ParseKeyFile succeeded; want errors %q", tt.wantErrs)
				}
				for _, w := range tt.wantErrs {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q does not contain %q", err, w)
					}
				}
				if got := strings.Count(err.Error(), "\n") + 1; got != len(tt.wantErrs) {
					t.Errorf("%d errors; want %d:\n%v", got, len(tt.wantErrs), err)
				}
				for _, secret := range []string{goodKey, otherKey, "bad\x01key", "non-ascii-é"} {
					if strings.Contains(err.Error(), secret) {
						t.Errorf("error %q echoes the key text %q", err, secret)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []k
			for _, key := range keys {
				got = append(got, k{key.Name, key.Scope})
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("keys (-want +got):\n%s", diff)
			}
			if key, ok := NewKeySet(keys...).Lookup(goodKey); !ok || key.Name != tt.want[0].Name {
				t.Errorf("the first key does not match after parsing: %+v %v", key, ok)
			}
		})
	}
}

func FuzzParseKeyFile(f *testing.F) {
	f.Add("key-one-key-one-key\n# c\nalice:abcdefabcdefabcdef read\n")
	f.Add("x:sha256:" + HashSecret("k") + " submit\n")
	f.Add(":\n a : b \n\ufeff\x00")
	f.Fuzz(func(t *testing.T, file string) {
		keys, err := ParseKeyFile(strings.NewReader(file))
		if err != nil {
			if keys != nil {
				t.Fatal("keys returned with an error")
			}
			return
		}
		names := map[string]bool{}
		for _, k := range keys {
			if CheckName(k.Name) != nil || names[k.Name] || k.Scope < route.ScopeRead || k.Scope > route.ScopeAdmin {
				t.Fatalf("bad key %+v", k)
			}
			names[k.Name] = true
		}
	})
}

func TestCredentials(t *testing.T) {
	tests := []struct {
		name    string
		headers map[string][]string
		query   string
		want    []Credential
	}{
		{"none", nil, "a=1", nil},
		{"bearer", map[string][]string{"Authorization": {"Bearer " + goodKey}}, "", []Credential{{SourceBearer, goodKey}}},
		{"bearer lower case, extra spaces", map[string][]string{"Authorization": {"bearer   " + goodKey}}, "", []Credential{{SourceBearer, goodKey}}},
		{"BEARER upper case", map[string][]string{"Authorization": {"BEARER " + goodKey}}, "", []Credential{{SourceBearer, goodKey}}},
		{"basic is not a key", map[string][]string{"Authorization": {"Basic dXNlcjpwYXNz"}}, "", nil},
		{"bare token without scheme", map[string][]string{"Authorization": {goodKey}}, "", nil},
		{"bearer without a key", map[string][]string{"Authorization": {"Bearer"}}, "", []Credential{{SourceBearer, ""}}},
		{"x-api-key", map[string][]string{"X-Api-Key": {goodKey}}, "", []Credential{{SourceHeader, goodKey}}},
		{"two x-api-key headers", map[string][]string{"X-Api-Key": {goodKey, "wrong"}}, "", []Credential{{SourceHeader, goodKey}, {SourceHeader, "wrong"}}},
		{"api_key query", nil, "clientId=1&api_key=" + goodKey, []Credential{{SourceQuery, goodKey}}},
		{"token query", nil, "token=" + goodKey + "&x=1", []Credential{{SourceToken, goodKey}}},
		{"encoded name", nil, "api%5Fkey=" + goodKey, []Credential{{SourceQuery, goodKey}}},
		{"encoded value", nil, "api_key=a%2Bb", []Credential{{SourceQuery, "a+b"}}},
		{"bad escape in value", nil, "api_key=%zz", []Credential{{SourceQuery, ""}}},
		{"empty value", nil, "api_key=", []Credential{{SourceQuery, ""}}},
		{"name only", nil, "api_key", []Credential{{SourceQuery, ""}}},
		{"semicolon is not a separator", nil, "a=1;api_key=x", nil},
		{"case matters like aiohttp", nil, "API_KEY=x&Token=y", nil},
		{"everything at once", map[string][]string{"Authorization": {"Bearer a"}, "X-Api-Key": {"b"}}, "api_key=c&token=d",
			[]Credential{{SourceBearer, "a"}, {SourceHeader, "b"}, {SourceQuery, "c"}, {SourceToken, "d"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest("GET", "/prompt?"+tt.query, nil)
			for k, vs := range tt.headers {
				for _, v := range vs {
					r.Header.Add(k, v)
				}
			}
			if diff := cmp.Diff(tt.want, Credentials(r)); diff != "" {
				t.Errorf("Credentials (-want +got):\n%s", diff)
			}
		})
	}
}

func TestStripKeepsEverythingElse(t *testing.T) {
	tests := []struct {
		query, want string
	}{
		{"", ""},
		{"api_key=k", ""},
		{"filename=a%20b.png&api_key=k&type=output", "filename=a%20b.png&type=output"},
		{"token=k&clientId=abc", "clientId=abc"},
		{"clientId=abc&token=k", "clientId=abc"},
		{"api%5fkey=k&subfolder=x%2Fy&&z", "subfolder=x%2Fy&&z"},
		{"api_key=a&api_key=b&token=c", ""},
		{"apikey=stays&tokens=stay", "apikey=stays&tokens=stay"},
		{"a=1;api_key=x", "a=1;api_key=x"}, // one parameter for aiohttp, not a key
		{"&z&api_key=k", "&z"},
	}
	for _, tt := range tests {
		r := httptest.NewRequest("GET", "/view?"+tt.query, nil)
		r.Header.Set("Authorization", "Bearer k")
		r.Header.Set("X-API-Key", "k")
		r.Header.Set("Comfy-User", "me")
		Strip(r)
		if r.URL.RawQuery != tt.want {
			t.Errorf("Strip(%q): query = %q; want %q", tt.query, r.URL.RawQuery, tt.want)
		}
		if got := Credentials(r); len(got) != 0 {
			t.Errorf("Strip(%q) left credentials %v", tt.query, got)
		}
		if r.Header.Get("Comfy-User") != "me" {
			t.Errorf("Strip removed an unrelated header")
		}
	}
}

func TestRedactQuery(t *testing.T) {
	got := RedactQuery("clientId=1&api_key=s3cret&token=s3cret2&api%5Fkey=s3cret3&key=s4&X-Access-Token=s5&filename=a.png&&type&x=1;api_key=s6")
	want := "clientId=1&api_key=REDACTED&token=REDACTED&api%5Fkey=REDACTED&key=REDACTED&X-Access-Token=REDACTED&filename=a.png&&type&x=1;api_key=REDACTED"
	if got != want {
		t.Errorf("RedactQuery = %q; want %q", got, want)
	}
}

func FuzzCredentials(f *testing.F) {
	f.Add("Bearer k", "k", "api_key=k&token=t&x=1")
	f.Add("bearer  k", "", "api%5Fkey=k")
	f.Add("Basic x", "k", "a=1;api_key=x&&token")
	f.Add("", "", "api_key=%zz&%zz=1")
	f.Fuzz(func(t *testing.T, authz, xkey, query string) {
		r := httptest.NewRequest("GET", "/prompt", nil)
		r.URL.RawQuery = query
		if authz != "" {
			r.Header.Set("Authorization", authz)
		}
		if xkey != "" {
			r.Header.Set("X-Api-Key", xkey)
		}
		creds := Credentials(r)
		for _, c := range creds {
			if c.Source == "" {
				t.Fatalf("credential without source: %+v", c)
			}
		}
		// Redaction leaves no credential value in place.
		red := httptest.NewRequest("GET", "/prompt", nil)
		red.URL.RawQuery = RedactQuery(query)
		// (RedactQuery also splits on ';', so a value may read
		// "REDACTED;next=…"; what matters is that it starts redacted.)
		for _, c := range Credentials(red) {
			if !strings.HasPrefix(c.Value, "REDACTED") {
				t.Fatalf("RedactQuery(%q) = %q leaves %+v", query, red.URL.RawQuery, c)
			}
		}
		// Strip leaves nothing a key could travel in.
		Strip(r)
		if left := Credentials(r); len(left) != 0 {
			t.Fatalf("Strip left %+v in query %q", left, r.URL.RawQuery)
		}
	})
}

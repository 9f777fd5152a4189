package auth

import (
	"strings"
	"testing"
)

// TestKeyFileShapeErrors pins issue #15 item 5: lines such as "Bearer KEY",
// "alice: KEY" or "bob:secret key here" were all reported as "unknown scope",
// which sent people looking for a scope they never wrote. Each error now says
// what the line was read as and which forms exist, and still never quotes a
// word that may be part of a key.
func TestKeyFileShapeErrors(t *testing.T) {
	const (
		secret = "s3cr3t-k3y-material-0123456789"
		word2  = "k3yword2"
		word3  = "k3yword3"
	)
	tests := []struct {
		name string
		line string
		want []string // substrings of the one error
	}{
		{"bearer prefix", "Bearer " + secret, []string{`line 1: the line starts with "Bearer"`, `without "Bearer "`, "NAME:sha256:HEX"}},
		{"whole header", "Authorization: Bearer " + secret, []string{`starts with "Authorization:"`, "write the key alone"}},
		{"api key header", "X-API-Key: " + secret, []string{`starts with "X-API-Key:"`}},
		{"space after the colon", "alice: " + secret, []string{`read as the name "alice" with nothing after the colon, then 1 more word`, "remove the space after the colon (alice:KEY", "KEY, NAME:KEY or NAME:sha256:HEX"}},
		{"space after the colon, with scope", "alice: " + secret + " read", []string{"then 2 more words", "remove the space after the colon"}},
		{"space before the colon", "alice :" + secret, []string{"read as KEY, then 1 more word starting with ':'", "remove the space before the colon"}},
		{"key with spaces", "bob:" + secret + " " + word2 + " " + word3, []string{"unknown scope (want read, submit or admin): read as bob:KEY, then 2 more words, and word 1 of them is not a scope", "a key cannot contain spaces", "NAME:KEY"}},
		{"second word bad after a scope", "bob:" + secret + " read " + word2, []string{"then 2 more words, and word 2 of them is not a scope"}},
		{"bare key with spaces", secret + " " + word2, []string{"read as KEY, then 1 more word that is not a scope"}},
		{"hashed, scope typo", "viewer:sha256:" + HashSecret(secret) + " raed", []string{"read as viewer:sha256:HEX, then 1 more word that is not a scope"}},
		{"bad name", "bad$name:" + secret + " " + word2, []string{"read as NAME:KEY with an invalid NAME"}},
		{"hash without a name", "sha256:" + HashSecret(secret), []string{"a hashed key needs a name: write NAME:sha256:HEX"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseKeyFile(strings.NewReader("# keys\n\n" + tt.line + "\n"))
			if err == nil {
				t.Fatal("ParseKeyFile accepted the line")
			}
			msg := strings.Replace(err.Error(), "line 3:", "line 1:", 1) // the line number is not the point
			for _, w := range tt.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error %q lacks %q", msg, w)
				}
			}
			for _, s := range []string{secret, word2, word3, HashSecret(secret)[:16]} {
				if strings.Contains(msg, s) {
					t.Errorf("error %q quotes key material %q", msg, s)
				}
			}
			if strings.Contains(msg, "\n") {
				t.Errorf("one bad line gave several errors: %q", msg)
			}
		})
	}
}

// TestKeyFileTabBeforeSpace: the first word ends at the first space or tab,
// whichever comes first, so "KEY<tab>read submit" is a key with scopes, not a
// key containing a tab.
func TestKeyFileTabBeforeSpace(t *testing.T) {
	keys, err := ParseKeyFile(strings.NewReader("bob:" + goodKey + "\tread, submit\n"))
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 1 || keys[0].Name != "bob" || keys[0].Scope.String() != "submit" {
		t.Errorf("keys = %+v", keys)
	}
	if _, ok := NewKeySet(keys...).Lookup(goodKey); !ok {
		t.Error("the key does not match")
	}
}

package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/pflag"

	"github.com/comfygate/comfygate/internal/auth"
)

const keysUsage = `Usage:
  comfygate keys new NAME [--scopes read|submit|admin]
      Make a new random key. Prints the key once, and the line to add to the
      key file, which holds only the key's SHA-256.
  comfygate keys hash [NAME] [--scopes read|submit|admin]
      Read a key on standard input and print its hashed key-file line.
  comfygate keys check FILE
      Validate a key file and report every problem with its line number.

Scopes: read (look: queue, history, outputs, node info, the WebSocket),
submit (read plus queueing prompts, uploads, interrupts, deletions),
admin (everything, including /free, user data writes and ComfyUI-Manager).
`

// errUsage marks a mistake in the command's words; the usage was printed.
var errUsage = errors.New("usage")

func runKeys(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return usageError(stderr, "which keys command? new, hash or check")
	}
	if args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stdout, keysUsage)
		return nil
	}
	fs := pflag.NewFlagSet("keys", pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	scopes := fs.String("scopes", "admin", "")
	if err := fs.Parse(args[1:]); err != nil {
		return usageError(stderr, err.Error())
	}
	scope, err := auth.ParseScopes(*scopes)
	if err != nil {
		return usageError(stderr, fmt.Sprintf("--scopes %q: %v", *scopes, err))
	}
	rest := fs.Args()

	switch args[0] {
	case "new":
		if len(rest) != 1 {
			return usageError(stderr, "keys new takes one NAME")
		}
		if err := auth.CheckName(rest[0]); err != nil {
			return usageError(stderr, err.Error())
		}
		secret := auth.NewSecret()
		fmt.Fprintf(stdout, "key for %s (shown only now; hand it over securely):\n  %s\n\nline for the key file:\n  %s\n",
			rest[0], secret, auth.KeyLine(rest[0], secret, scope))
		return nil

	case "hash":
		name := "key"
		if len(rest) > 1 {
			return usageError(stderr, "keys hash takes at most one NAME")
		}
		if len(rest) == 1 {
			name = rest[0]
		}
		if err := auth.CheckName(name); err != nil {
			return usageError(stderr, err.Error())
		}
		line, err := bufio.NewReader(stdin).ReadString('\n')
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("reading the key from standard input: %w", err)
		}
		secret := strings.TrimSpace(line)
		if err := auth.CheckSecret(secret); err != nil {
			return fmt.Errorf("the key on standard input cannot work: %w", err)
		}
		fmt.Fprintln(stdout, auth.KeyLine(name, secret, scope))
		return nil

	case "check":
		if len(rest) != 1 {
			return usageError(stderr, "keys check takes one FILE")
		}
		f, err := os.Open(rest[0])
		if err != nil {
			return err
		}
		defer f.Close()
		keys, err := auth.ParseKeyFile(f)
		if err != nil {
			return fmt.Errorf("%s:\n  %s", rest[0], strings.ReplaceAll(err.Error(), "\n", "\n  "))
		}
		if len(keys) == 0 {
			return fmt.Errorf("%s holds no key", rest[0])
		}
		fmt.Fprintf(stdout, "%s: %s OK\n", rest[0], plural(len(keys), "key"))
		for _, k := range keys {
			note := ""
			if k.Short {
				note = fmt.Sprintf("  (shorter than %d characters)", auth.MinRecommendedKeyLen)
			}
			fmt.Fprintf(stdout, "  %-20s %s%s\n", k.Name, k.Scope, note)
		}
		return nil
	}
	return usageError(stderr, fmt.Sprintf("unknown keys command %q", args[0]))
}

func usageError(w io.Writer, msg string) error {
	fmt.Fprintf(w, "comfygate keys: %s\n\n%s", msg, keysUsage)
	return errUsage
}

// Package auth decides whether a request may reach ComfyUI.
//
// It holds the configured API keys (hashed, never in plaintext after start-up),
// finds every credential a request carries (Authorization: Bearer, X-API-Key,
// and the api_key and token query parameters), checks them against what the
// request's route entry needs (public or protected, and which scope; see
// package route, whose table classifies every request once), and removes the
// credentials before the request goes upstream, so ComfyUI and its logs never
// see a key.
//
// The rules, in short:
//   - Only GET and HEAD of the web UI page, its static assets and /ws are
//     public (and /ws only without --protect-ws); everything else, including
//     unknown paths and routes added by custom nodes, needs a valid key.
//   - A path that is not in plain canonical form (dot segments, doubled or
//     encoded slashes, encoded dots, backslashes) is never public.
//   - A request that carries several credentials is let in only if every one
//     of them is valid.
//   - Repeated invalid credentials from one address lock it out
//     (ratelimit.Lockout).
package auth

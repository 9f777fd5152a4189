//go:build !unix

package redistest

// Pause needs SIGSTOP; elsewhere the test is skipped.
func (s *Server) Pause() { s.t.Skip("pausing redis-server needs SIGSTOP (Unix)") }

// Resume does nothing where Pause cannot pause.
func (s *Server) Resume() {}

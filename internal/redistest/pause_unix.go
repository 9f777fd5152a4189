//go:build unix

package redistest

import "syscall"

// Pause stops the server process (SIGSTOP): it keeps its connections and
// port but answers nothing, as a Redis that is stuck or unreachable does.
// Resume undoes it; Stop works on a paused server too.
func (s *Server) Pause() {
	if err := s.process().Signal(syscall.SIGSTOP); err != nil {
		s.t.Fatal(err)
	}
	s.t.Cleanup(s.Resume)
}

// Resume continues a paused server (SIGCONT).
func (s *Server) Resume() {
	s.mu.Lock()
	cmd := s.cmd
	s.mu.Unlock()
	if cmd != nil {
		cmd.Process.Signal(syscall.SIGCONT)
	}
}

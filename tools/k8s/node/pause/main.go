// pause: the sandbox ("pause") image of the real test nodes' containerd. It holds a pod's
// namespaces open, reaps orphaned children (it is PID 1 when a pod shares its process
// namespace) and exits 0 on SIGINT/SIGTERM, as registry.k8s.io/pause does. Built here,
// static, because this machine reaches no container registry.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			if pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil); pid <= 0 || err != nil {
				break
			}
		}
	}
}

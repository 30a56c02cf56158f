// netprobe: the network test image of the `pods` tests (tests/pods/test_network_policy.py), a
// static binary that listens and dials, so that a test can ask from inside one pod whether a
// TCP connection to another pod's port is let through.
//
//	netprobe serve NAME PORT...   accepts on each PORT; every connection gets "NAME PORT\n"
//	                              and is closed; runs until SIGTERM (exit 0)
//	netprobe dial ADDR SECONDS    connects to ADDR (ip:port) within SECONDS and prints what the
//	                              server said (exit 0), or prints the error (exit 1)
package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 4 {
		fmt.Fprintln(os.Stderr, "usage: netprobe serve NAME PORT... | netprobe dial ADDR SECONDS")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "serve":
		serve(os.Args[2], os.Args[3:])
	case "dial":
		seconds, err := strconv.ParseFloat(os.Args[3], 64)
		if err != nil {
			fmt.Fprintln(os.Stderr, "netprobe: SECONDS:", err)
			os.Exit(2)
		}
		os.Exit(dial(os.Args[2], time.Duration(seconds*float64(time.Second))))
	default:
		fmt.Fprintln(os.Stderr, "netprobe: unknown mode", os.Args[1])
		os.Exit(2)
	}
}

func serve(name string, ports []string) {
	for _, port := range ports {
		listener, err := net.Listen("tcp", ":"+port)
		if err != nil {
			fmt.Fprintln(os.Stderr, "netprobe:", err)
			os.Exit(1)
		}
		go func(port string) {
			for {
				conn, err := listener.Accept()
				if err != nil {
					continue
				}
				fmt.Fprintf(conn, "%s %s\n", name, port)
				conn.Close()
			}
		}(port)
	}
	fmt.Println("netprobe: serving on", ports)
	terms := make(chan os.Signal, 1)
	signal.Notify(terms, syscall.SIGTERM)
	<-terms
}

func dial(addr string, timeout time.Duration) int {
	conn, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		fmt.Println("netprobe: dial", addr+":", err)
		return 1
	}
	defer conn.Close()
	conn.SetReadDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		fmt.Println("netprobe: read from", addr+":", err)
		return 1
	}
	fmt.Print(line)
	return 0
}

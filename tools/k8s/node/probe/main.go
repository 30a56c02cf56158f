// probe: the test image of the `pods` tests, a static binary that shows what a kubelet does
// with a container's output, exit code and termination signal.
//
//	probe print TEXT...       prints TEXT on stdout and a line on stderr, then sleeps until SIGTERM (exit 0)
//	probe exit CODE           prints a line and exits with CODE
//	probe term FILE SECONDS   waits for SIGTERM, appends "SIGTERM <unix time>" to FILE,
//	                          sleeps SECONDS (a checkpoint's worth of work), exits 0
//	probe ignore FILE         ignores SIGTERM (appending "ignored SIGTERM" to FILE): only
//	                          SIGKILL at the end of the grace period ends it
package main

import (
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func appendLine(path, line string) {
	f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		fmt.Fprintln(os.Stderr, "probe:", err)
		os.Exit(2)
	}
	fmt.Fprintln(f, line)
	f.Close()
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: probe print|exit|term|ignore ARGS")
		os.Exit(2)
	}
	terms := make(chan os.Signal, 1)
	signal.Notify(terms, syscall.SIGTERM)
	args := os.Args[2:]
	switch os.Args[1] {
	case "print":
		fmt.Println(strings.Join(args, " "))
		fmt.Fprintln(os.Stderr, "probe: printed to stdout")
		<-terms
	case "exit":
		code, _ := strconv.Atoi(args[0])
		fmt.Printf("probe: exiting with %d\n", code)
		os.Exit(code)
	case "term":
		seconds, _ := strconv.ParseFloat(args[1], 64)
		fmt.Println("probe: waiting for SIGTERM")
		<-terms
		appendLine(args[0], fmt.Sprintf("SIGTERM %d", time.Now().Unix()))
		time.Sleep(time.Duration(seconds * float64(time.Second)))
		appendLine(args[0], "done")
	case "ignore":
		fmt.Println("probe: ignoring SIGTERM")
		for range terms {
			appendLine(args[0], "ignored SIGTERM")
		}
	default:
		fmt.Fprintln(os.Stderr, "probe: unknown mode", os.Args[1])
		os.Exit(2)
	}
}

// netpol-queue: the packet path of kube-network-policies on a kernel without nftables' queue
// expression. The controller hands the first packet of each new connection of a pod under a
// NetworkPolicy to user space with nftables' `queue` statement, which needs CONFIG_NFT_QUEUE;
// this machine's kernel has no such expression ("Could not process rule: No such file or
// directory") but has the xtables NFQUEUE target and nftables' xtables compatibility layer
// (CONFIG_NETFILTER_XT_TARGET_NFQUEUE, CONFIG_NFT_COMPAT). So this program adds, in a table
// of its own, the rules the controller would add, with NFQUEUE through that layer; the
// controller itself reads the queue and decides each packet, unchanged.
//
//	netpol-queue TABLE QUEUE PREFIX
//
// adds `table ip TABLE` with one chain on the forward hook: established and related packets
// pass, and a new connection that arrives from or leaves through an interface whose name
// begins with PREFIX (a node set's bridges: its pods' egress and ingress) goes to queue QUEUE.
// The controller hooks postrouting and matches pod addresses, for IPVS's sake; here there is
// no IPVS, and matching by the set's own bridges means a table left behind by a killed
// session matches nothing once its bridges are gone, whoever reuses its subnets. Pod-to-pod
// traffic on one bridge passes the forward hook too (br_netfilter,
// net.bridge.bridge-nf-call-iptables=1); the host's own connections to pods do not (upstream
// lets root's through anyway). Without the bypass flag: while no controller reads the queue,
// those packets are dropped (fail closed, the controller's default). `nft delete table ip
// TABLE` removes it all.
package main

import (
	"encoding/binary"
	"fmt"
	"os"
	"strconv"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"golang.org/x/sys/unix"
)

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: netpol-queue TABLE QUEUE PREFIX")
		os.Exit(2)
	}
	queue, err := strconv.ParseUint(os.Args[2], 10, 16)
	if err != nil {
		fail("QUEUE %q: %v", os.Args[2], err)
	}
	prefix := os.Args[3]
	if prefix == "" || len(prefix) >= unix.IFNAMSIZ {
		fail("PREFIX %q: an interface name's beginning, 1 to %d characters", prefix, unix.IFNAMSIZ-1)
	}
	if err := install(os.Args[1], uint16(queue), prefix); err != nil {
		fail("adding table ip %s: %v", os.Args[1], err)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "netpol-queue: "+format+"\n", args...)
	os.Exit(1)
}

func install(name string, queue uint16, prefix string) error {
	conn, err := nftables.New()
	if err != nil {
		return err
	}
	table := conn.AddTable(&nftables.Table{Name: name, Family: nftables.TableFamilyIPv4})
	chain := conn.AddChain(&nftables.Chain{
		Name: "forward", Table: table, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter,
	})
	rule := func(exprs ...expr.Any) {
		conn.AddRule(&nftables.Rule{Table: table, Chain: chain, Exprs: exprs})
	}
	// ct state established,related accept
	rule(&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: native32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
		&expr.Verdict{Kind: expr.VerdictAccept})
	// iifname "PREFIX*" (egress of the set's pods), oifname "PREFIX*" (their ingress): a
	// comparison of the name's first len(PREFIX) bytes, as nft compiles a wildcard
	for _, key := range []expr.MetaKey{expr.MetaKeyIIFNAME, expr.MetaKeyOIFNAME} {
		rule(&expr.Meta{Key: key, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte(prefix)},
			nfqueue(queue))
	}
	return conn.Flush()
}

// nfqueue is iptables' `-j NFQUEUE --queue-num QUEUE` (xt_NFQ_info_v3: queue number, queues
// in total, flags; host byte order, padded to the xtables alignment of 8 bytes).
func nfqueue(queue uint16) *expr.Target {
	info := make(xt.Unknown, 8)
	binary.NativeEndian.PutUint16(info[0:], queue)
	binary.NativeEndian.PutUint16(info[2:], 1) // one queue
	binary.NativeEndian.PutUint16(info[4:], 0) // no bypass: fail closed
	return &expr.Target{Name: "NFQUEUE", Rev: 3, Info: &info}
}

func native32(v uint32) []byte {
	b := make([]byte, 4)
	binary.NativeEndian.PutUint32(b, v)
	return b
}

# The test suite's Kubernetes control plane (tests/cluster, docs/cluster.md): etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok and helm built from
# the Go modules pinned in tools/k8s/*/go.mod, plus Debian's prometheus binary, cached in
# $(BLOOMRUN_HOME)/k8s/<version>-<pins hash>/bin and built once (tools/k8s/build.sh).
# The real nodes' programs (kubelet, pause, probe from tools/k8s/node; containerd, runc and
# CNI plugins unpacked from Debian's packages) go to <version>-node-<hash>/bin
# (tools/k8s/build-node.sh): nothing is installed on the machine. Their cluster DNS (CoreDNS,
# from tools/k8s/net) and nft (Debian's, unpacked) go to <version>-net-<hash>/bin
# (tools/k8s/build-net.sh); their NetworkPolicy enforcement (kube-network-policies, from
# tools/k8s/netpol) to <version>-netpol-<hash>/bin (tools/k8s/build-netpol.sh).

.PHONY: k8s k8s-bin-dir k8s-node-bin-dir k8s-net-bin-dir k8s-netpol-bin-dir
k8s:
	bash tools/k8s/build.sh
	bash tools/k8s/build-node.sh
	bash tools/k8s/build-net.sh
	bash tools/k8s/build-netpol.sh

k8s-bin-dir:
	@bash tools/k8s/bindir.sh

k8s-node-bin-dir:
	@bash tools/k8s/bindir.sh node

k8s-net-bin-dir:
	@bash tools/k8s/bindir.sh net

k8s-netpol-bin-dir:
	@bash tools/k8s/bindir.sh netpol

TEST_DEPS += k8s

# The test suite's Kubernetes control plane (tests/cluster, docs/cluster.md): etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok and helm built from
# the Go modules pinned in tools/k8s/*/go.mod, plus Debian's prometheus binary, cached in
# $(BLOOMRUN_HOME)/k8s/<version>-<pins hash>/bin and built once (tools/k8s/build.sh).
# The real nodes' programs (kubelet, pause, probe from tools/k8s/node; containerd, runc and
# CNI plugins unpacked from Debian's packages) go to <version>-node-<hash>/bin
# (tools/k8s/build-node.sh): nothing is installed on the machine.

.PHONY: k8s k8s-bin-dir k8s-node-bin-dir
k8s:
	bash tools/k8s/build.sh
	bash tools/k8s/build-node.sh

k8s-bin-dir:
	@bash tools/k8s/bindir.sh

k8s-node-bin-dir:
	@bash tools/k8s/bindir.sh node

TEST_DEPS += k8s

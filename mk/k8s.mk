# The test suite's Kubernetes control plane (tests/cluster, docs/cluster.md): etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok and helm built from
# the Go modules pinned in tools/k8s/*/go.mod, plus Debian's prometheus binary, cached in
# $(BLOOMRUN_HOME)/k8s/<version>-<pins hash>/bin and built once (tools/k8s/build.sh).

.PHONY: k8s k8s-bin-dir
k8s:
	bash tools/k8s/build.sh

k8s-bin-dir:
	@bash tools/k8s/bindir.sh

TEST_DEPS += k8s

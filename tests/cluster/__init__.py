"""A real Kubernetes control plane as a test fixture.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler built from the pinned
Kubernetes module (tools/k8s), with kwok simulating A100 node pools and pod lifecycles in
place of kubelets. The pytest plugin `tests.cluster.fixture` provides the session-scoped
`cluster` fixture; `python -m tests.cluster` starts one by hand. See docs/cluster.md.
"""

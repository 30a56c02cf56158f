"""bloomrun: Kubernetes-native training of BLOOM-style language models."""

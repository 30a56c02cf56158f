# Images from the repository's Dockerfiles, built here without Docker or a registry
# (tools/images/build.sh: buildah bud --isolation chroot on a Debian base made with
# mmdebstrap; docs/cluster.md, "Images"). Not a prerequisite of `make test` yet: the CPU
# trainer image is ~20 min and several GB on a fresh machine (BENCHMARKS.md).

.PHONY: images
images:
	bash tools/images/build.sh trainer

# Images from the repository's Dockerfiles, built here without Docker or a registry
# (tools/images/build.sh: buildah bud --isolation chroot on a Debian base made with
# mmdebstrap; docs/cluster.md, "Images"). Each is cached by the hash of its inputs (an
# unchanged tree costs a hash); a change to bloomrun/ rebuilds the last small layers, then
# the archive. `make test` needs no target here: the `pods` tests build both images on first
# use (tests/pods/images.py) and import them into the real nodes; the trainer's costs 9-15
# min cold at a low load (the 7 GB dependency layer), about 4 min after a change to bloomrun/
# (BENCHMARKS.md, "Real pods"). `make images` builds them ahead, e.g. before a demo.

.PHONY: images
images:
	bash tools/images/build.sh operator
	bash tools/images/build.sh trainer

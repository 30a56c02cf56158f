"""`python -m tests.cluster`: start a test cluster by hand and keep it until Ctrl-C."""

import signal
import sys

from tests.cluster.control_plane import start_cluster


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the cluster cleanly too
    cluster = start_cluster()
    print(f"cluster up in {cluster.start_seconds:.1f} s\n"
          f"export KUBECONFIG={cluster.kubeconfig}\n"
          f"export PATH={cluster.bin_dir}:$PATH\n"
          f"logs: {cluster.layout.logs}\nCtrl-C stops it.", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())

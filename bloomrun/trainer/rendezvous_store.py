"""The run's rendezvous store as a process of its own: `python -m bloomrun.trainer.rendezvous_store`.

torchrun's c10d rendezvous keeps its state in a TCPStore that one agent hosts (the one whose
address is the endpoint: worker-0 in a pod). The store dies with that agent, and with it the
rendezvous: measured with torch 2.15, SIGKILL of the hosting agent made the other agent exit
within a second (RendezvousConnectionError), so losing worker-0 failed the whole run
(Kubeflow's PyTorchJob points c10d at worker-0 and has the same weakness). Here the store
runs apart from every agent (its own pod on a cluster), and every agent joins as a client
(`is_host=false`), so no worker is special: any one of them can go and the others re-form.

The store holds only rendezvous state, so its loss costs a re-rendezvous, not training state:
the agents' TCPStore clients never reconnect, so each stops its worker with SIGTERM (which
saves the step reached) and exits 1, and the operator replaces them (docs/operator.md).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from datetime import timedelta

DEFAULT_PORT = 29400


def serve(port: int, stop: threading.Event) -> None:
    from torch.distributed import TCPStore

    store = TCPStore("0.0.0.0", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    print(f"rendezvous store listening on port {store.port}", flush=True)
    stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bloomrun.trainer.rendezvous_store", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    serve(args.port, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())

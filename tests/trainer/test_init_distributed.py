"""parallel.init_distributed: the process group comes up without DeepSpeed compiling anything.

In the trainer image DeepSpeed ships no prebuilt op (DS_BUILD_OPS=0), so its comm backend
JIT-compiled its shared-memory all-reduce with g++ before it created the process group; in a
pod, with a fresh extension cache, rank 0's store came up minutes late and the peers timed out
(issue 11). The local venv's DeepSpeed has that op prebuilt, so the test asks what DeepSpeed
decided (no shm op) instead of timing a compile.
"""

import subprocess
import sys
import textwrap


def test_the_process_group_comes_up_without_deepspeeds_shared_memory_op(tmp_path):
    script = textwrap.dedent("""
        import os
        from pathlib import Path
        from bloomrun.trainer import parallel
        from bloomrun.trainer.elastic import free_ports
        os.environ.update(TORCH_EXTENSIONS_DIR=os.path.abspath("ext"), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_ports(1)[0]), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        world = parallel.World.from_env()
        parallel.prepare_environment(Path("cache"), world)
        parallel.init_distributed(world)
        import torch.distributed as dist
        import deepspeed.comm.comm as ds_comm
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        print("shm op:", ds_comm.cdb.shm_comm_op)
        print("compiled:", os.listdir("ext") if os.path.exists("ext") else [])
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shm op: None" in done.stdout, done.stdout
    assert "compiled: []" in done.stdout, done.stdout

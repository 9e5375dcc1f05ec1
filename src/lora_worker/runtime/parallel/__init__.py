"""Multi-GPU jobs: one torchrun process group per job, launched and torn down by the worker.

    worker process (RunPod handler thread)          launch.py: launch_group
      └─ agent: torchrun's elastic launcher          agent.py (torch.distributed.launcher.api)
           ├─ rank 0: the whole job story            rank.py: lead -> job.run_claimed
           └─ rank 1..N-1: load, train, exit         rank.py: follow -> training.trainer.train
                (sharded: also serve rank 0's forwards  relay.py; the FSDP model: fsdp.py)

The request travels in the ranks' environment; the files of one launch live in a private folder
on the worker's local disk (rundir.py).
"""

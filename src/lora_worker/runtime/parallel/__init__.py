"""Multi-GPU jobs: one torchrun process group per job, launched and torn down by the worker.

    worker process (RunPod handler thread)          launch.py: launch_group
      └─ agent: torchrun's elastic launcher          agent.py (torch.distributed.launcher.api)
           ├─ rank 0: the whole job story            rank.py: lead -> job.run_claimed
           └─ rank 1..N-1: load, train, exit         rank.py: follow -> training.trainer.train

Files of one launch live in `jobs/<job_id>/group/` (rundir.py).
"""

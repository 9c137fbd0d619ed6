"""Exit codes of a launch that a scheduler wrapper tells apart (README, "Faults and exit codes"), and the signals
that ask for a stop.

One home for them: the ranks (`pretrain.train`), their loader workers, our launcher (`pretrain.launch`) and
`launch/slurm.sbatch` agree.
"""

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Finish the current step, save, exit `PREEMPTED` (SLURM's time limit / scancel, and its early `--signal`)."""

OK = 0
FAILED = 1
"""An error with a traceback (a bug, a lost rank, an unreadable file)."""
USAGE = 2
"""A problem the user can fix, named in one line: a bad config, missing shards, a full disk during a save."""
PREEMPTED = 75
"""sysexits' EX_TEMPFAIL: stopped by SIGTERM / SIGUSR1 after saving a checkpoint at the last finished step; running
the same command again resumes from it. A SLURM batch script requeues the job on this code."""
STALLED = 124
"""A step, save or evaluation outlasted `train.collective_timeout_s` (as GNU `timeout`): a peer rank froze or died."""

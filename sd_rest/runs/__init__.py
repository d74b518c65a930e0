"""Running one job's script: the runner seam (seam.py) and the two runners behind it (one
process per job on a pty; resident workers, their pool and warm-up), the run workspace, argv
and environment, processes, progress parsing, the folder watcher, publishing each image with
its labels and provenance, and how a run ended.

May use: state (the job, the store a run writes through) and the shared base. Never jobs or
api: a runner reports through its sink and never changes a job's state itself. The worker's
driver (../worker_driver) is run by path in the fork's interpreter, never imported."""

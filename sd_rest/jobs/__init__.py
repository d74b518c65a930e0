"""Orchestration of jobs: the manager (submit, cancel, run: it decides every transition), the
queue of waiting jobs and their positions, recovery at start, and the listing's pages.

May use: runs (it asks a runner to run each job), state and the shared base. Used by api,
server and cli."""

"""Start-up and `--check`: what the server reads before it serves, and whether this user can
reach it (access), certificates, checkpoints, the fork's imports (a probe run in the fork's
interpreter), demo mode.

May use: state (the output folder's layout, free space) and the shared base. Used by cli and
server only."""

"""Several worker hosts behind one API node, on Dramatiq with its Redis broker: what both
sides share (key names, the job message, the report entries, the broker's settings), the API
node's side of Redis (enqueue, follow the reports, cancel, the live workers) and the fenced
writes a worker host makes.

May use: state, endpoints, scripts, settings, images, fields, errors (and dramatiq, redis:
the `cluster` extra). The runners above it (runs/remote_runner.py) and the worker host
(workerhost/) use it.
"""

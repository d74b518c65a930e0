"""Durable job state: the job record and its status document, the lifecycle (the state
machine), change events, the store (its facade over the sidecar files, the jobs kept in memory
and the writes the disk refused), the SQLite index and its items, quarantine, the on-disk
layout, durable files, disk space, and the listing cursors' key.

May use: the shared base only (endpoints, scripts, settings, images, fields, errors)."""

"""A worker host: `stable-diffusion-rest-api worker --broker URL`. It takes jobs from the
Dramatiq queues of the checkpoints it holds, runs each with the local runners (a resident
worker or one process per job, exactly as a server does), and reports every step into the
job's Redis stream, fenced by its attempt, for the API node to keep.

May use: runs, cluster, state, setup's checks, endpoints, scripts, settings, images, fields,
errors.
"""

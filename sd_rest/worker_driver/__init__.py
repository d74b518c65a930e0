"""The resident worker's driver (issue 10): one long-lived interpreter of the fork's venv that
runs the fork's *unmodified* scripts (txt2img.py, img2img.py, inpaint.py) as ``__main__`` with
each job's argv, keeping what is expensive to make between runs, with PNGs byte-identical to a
run by hand whatever ran before in this worker.

This package is never imported by the server: the fork's interpreter runs it as a folder,

    <fork venv python> <...>/sd_rest/worker_driver

with cwd = the repository, the scripts' environment (``scripts.script_environment()``:
``PYTHONPATH=<repository>``, ``PYTORCH_ENABLE_MPS_FALLBACK=1``, ``PYTHONUNBUFFERED=1``) plus

    SD_REST_WORKER_SOCKET=<path of a Unix socket the server listens on>
    SD_REST_WORKER_TOKEN=<random hex the server checks in "ready">
    SD_REST_WORKER_HEARTBEAT=<seconds between heartbeats> (optional, default 2)

and stdin/stdout/stderr on a pty (the scripts' own output, tqdm bars included, keeps flowing
there; give it dimensions, or tqdm draws empty bars). It runs on Python 3.8-3.11 and imports
only the standard library; torch, numpy and the rest are imported by the scripts, and the
driver uses what they imported. These variables are removed from ``os.environ`` at start, so
the scripts see the environment a run by hand sees. Diagnostic switches (tests only):
``SD_REST_WORKER_ALIAS=0`` keeps the cached checkpoint as read (a second copy of the weights);
``SD_REST_WORKER_GENERATOR=replay|rebuild`` skips the faster ways of keeping the generator in
step; ``SD_REST_WORKER_GENERATOR=off`` does not keep it in step at all (PNGs then differ from a
run by hand whenever a model is reused for another seed: it shows that the step matters).

Control channel: the driver connects to the socket; one JSON object per line, UTF-8, both
ways. EOF from the server: the worker exits at once, even mid-job.

worker -> server
  {"event":"ready","pid":int,"python":"3.11.7","driver":VERSION,"token":str}
        once, first: the token from SD_REST_WORKER_TOKEN (the server drops a connection whose
        token is wrong, and the worker then exits)
  {"event":"started","job":ID}                                              a run began
  {"event":"finished","job":ID,"outcome":"ok"|"error"|"interrupted",
   "exit_code":int,"error":str|null,"oom":bool,"recycle":str|null,"seconds":float,
   "cache":{"model":"hit"|"built"|null,"generator":"jump"|"replay"|"rebuild"|"same-seed"|
            "prepared"|"off"|null,"checkpoint":"hit"|"read"|null,"evicted":bool}|null}
        Sent after the script ended AND the worker is idle and consistent again (cached model
        repaired, run state restored, memory released). exit_code is what the same script run by
        hand would have exited with: 0 ok, 1 uncaught exception, SystemExit's own code (argparse
        errors: 2; a missing script: 2 with "cache" null), -2 (killed by SIGINT) for an
        interrupt. recycle non-null: the worker advises its replacement (out of memory; an
        exception that went through an import, which can leave a package half imported). A
        cancelled job may still end "error" (libraries can turn the KeyboardInterrupt into
        their own exception) or even "ok" (an interrupt that lands in a __del__ is swallowed):
        the server knows it cancelled. error: at most 2,000 characters (and a note of how many
        more are in the job's log), here and in "fatal": the server reads lines of 1 MiB at most.
  {"event":"status","pid":int,"rss":bytes|null,"busy":bool,"job":ID|null,"jobs":n,
   "models":[{"config":sha,"checkpoint":path|null,"generator":mode|null,"params":n,
              "generator_words":n|null,"generator_check_s":float|null,
              "generator_reasons":[str]}],
   "uptime":seconds}                                                        reply to "status"
        generator: how a reuse keeps the generator in step ("jump", "replay", "rebuild";
        "off" under the diagnostic switch; null while being decided); generator_reasons: why
        it fell back to "rebuild" (e.g. "no TorchDispatchMode": an old or stand-in torch).
  {"event":"heartbeat", ...the fields of "status"}
        every SD_REST_WORKER_HEARTBEAT seconds from its own thread, busy or idle, from "ready"
        on, whatever the script does (rss measured after each job, else at most a minute
        old): the server kills a worker silent for longer than its limit (stopped, or hung
        holding the interpreter lock) and shows the last one in `GET /`.
  {"event":"check","ok":bool,"detail":str}                                  reply to "check"
  {"event":"error","error":str}                                             a bad request
  {"event":"fatal","job":ID,"error":str}     the driver itself failed; it exits (status 70) next

server -> worker
  {"op":"run","job":ID,"script":ABS_PATH,"argv":[flags...],"cwd":DIR,"seed":int|null,
   "marker":str|null}
        Run one job. seed non-null: torch.manual_seed(seed) right before the script (inpaint.py
        has no seed flag; a run by hand gets it from a sitecustomize at interpreter start). As
        with the sitecustomize, an interpreter that cannot import torch runs the script anyway
        (an ImportError is passed over; another error is one line on stderr): the script's own
        `import torch` then fails the job with the script's error, as a run by hand does.
        marker non-null: written raw to fd 1 (the pty) after the job's last output byte and
        before "finished", so the server can cut the pty stream exactly at the job's end (pty
        data can reach the master side later than a socket message sent after it).
        A "run" received while busy is queued.
  {"op":"prepare","seed":int}   hint: a job seeded with `seed` comes next; the generator state
        its model build would leave is computed in a background thread (only worth it when the
        resident model's generator plan is "replay"; "jump" costs ~0.03 s anyway).
  {"op":"status"}               answered at once, even while busy (from the reader thread)
  {"op":"check"}                test aid: compare the resident model's weights with a fresh
        torch.load of its checkpoint (queued like a run; slow for big models)
  {"op":"exit"}                 exit once idle (os._exit: no interpreter teardown)

Signals: SIGINT while a script runs raises KeyboardInterrupt in it (outcome "interrupted");
SIGINT while idle is ignored. SIGTERM/SIGHUP keep their default (the process dies).

What is kept between runs (research-10/NOTES.md says why each is safe):
  * imported modules;
  * the model built by the top-level ``instantiate_from_config`` call of a run (nested calls pass
    through), one at a time, keyed by the config's content; it is reused only while the weights
    it holds are exactly a checkpoint's (a complete ``load_state_dict`` with no missing keys, in
    every run that used it);
  * that checkpoint's ``torch.load`` result, keyed by real path, size, mtime and inode, with its
    state_dict tensors replaced by the model's own tensors (no second copy of the weights);
  * the safety checker and feature extractor (``from_pretrained`` at txt2img's module level).
A run that reuses the model gets the CPU generator exactly where the real build would have left
it: the first build is recorded (RNG-consuming aten ops, via a TorchDispatchMode) and later runs
advance the generator by the recorded number of Mersenne-Twister words with a GF(2) jump-ahead
(~0.03 s for the full-size SD v1 UNet+VAE), or by replaying the draws on a private generator, or,
as a last resort (no TorchDispatchMode, as with sd-rest's simulator), by calling the real
constructor again and dropping the result. The method is chosen after checking it against the
first build's real before/after generator states.

Modules: ``worker`` (start-up, the channel's messages, status), ``runner`` (one script run),
``caches`` (what is kept), ``resident`` (the resident model and its first build), ``hooks``
(the patches applied as the scripts import torch, ldm and the safety checker), ``generator``
(recording a build, the plans), ``mtjump`` (the jump-ahead), ``channel`` (JSON lines on the
socket).
"""

VERSION = "1.0"
SOCKET_ENV = "SD_REST_WORKER_SOCKET"
TOKEN_ENV = "SD_REST_WORKER_TOKEN"
HEARTBEAT_ENV = "SD_REST_WORKER_HEARTBEAT"
ALIAS_ENV = "SD_REST_WORKER_ALIAS"
GENERATOR_ENV = "SD_REST_WORKER_GENERATOR"

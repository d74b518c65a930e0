"""Resident worker for sd-rest (issue 10): one long-lived interpreter of the fork's venv that runs
the fork's *unmodified* scripts (txt2img.py, img2img.py, inpaint.py) as ``__main__`` with each
job's argv, keeping what is expensive to make between runs, with PNGs byte-identical to a run by
hand whatever ran before in this worker.

Started as ``<fork venv python> worker_driver.py`` with cwd = the repository, the scripts'
environment (``PYTHONPATH=<repository>``, ``PYTORCH_ENABLE_MPS_FALLBACK=1``,
``PYTHONUNBUFFERED=1``), stdin/stdout/stderr on a pty (the scripts' own output, tqdm bars
included, keeps flowing there), and ``SD_REST_WORKER_FD`` naming an inherited socket (one end of
a ``socket.socketpair()``) that carries the control channel. Stdlib only at import; torch, numpy
and the rest are imported only by the scripts (the driver uses what they imported).

Control channel: one JSON object per line, UTF-8, both ways.

worker -> server
  {"event":"ready","pid":int,"python":"3.11.7","driver":VERSION}          once, at start
  {"event":"started","job":ID}                                              a run began
  {"event":"finished","job":ID,"outcome":"ok"|"error"|"interrupted",
   "exit_code":int,"error":str|null,"oom":bool,"recycle":str|null,"seconds":float,
   "cache":{"model":"hit"|"built"|null,"generator":"jump"|"replay"|"rebuild"|"same-seed"|
            "prepared"|null,"checkpoint":"hit"|"read"|null,"evicted":bool}}
        Sent after the script ended AND the worker is idle and consistent again (cached model
        repaired, run state restored, memory released). exit_code is what the same script run by
        hand would have exited with: 0 ok, 1 uncaught exception, SystemExit's own code (argparse
        errors: 2), -2 (killed by SIGINT) for an interrupt. recycle non-null: the worker advises
        its replacement (out of memory; an exception that went through an import, which can
        leave a package half imported). A cancelled job may still end "error" (libraries can
        turn the KeyboardInterrupt into their own exception) or even "ok" (an interrupt that
        lands in a __del__ is swallowed): the server knows it cancelled.
  {"event":"status","pid":int,"rss":bytes,"busy":bool,"job":ID|null,"jobs":n,
   "models":[{"config":sha,"checkpoint":path|null,"generator":mode|null,"params":n}],
   "uptime":seconds}                                                        reply to "status"
  {"event":"check","ok":bool,"detail":str}                                  reply to "check"
  {"event":"error","error":str}                                             a bad request
  {"event":"fatal","job":ID,"error":str}   the driver itself failed; it exits (status 70) right after

server -> worker
  {"op":"run","job":ID,"script":ABS_PATH,"argv":[flags...],"cwd":DIR,"seed":int|null,
   "marker":str|null}
        Run one job. seed non-null: torch.manual_seed(seed) right before the script (inpaint.py
        has no seed flag; a run by hand gets it from a sitecustomize at interpreter start).
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
SIGINT while idle is ignored. SIGTERM/SIGHUP keep their default (the process dies). If the
control socket reaches EOF (the server is gone), the worker exits at once, even mid-job.

What is kept between runs (see NOTES.md for why each is safe):
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
as a last resort, by calling the real constructor again and dropping the result. The method is
chosen after checking it against the first build's real before/after generator states.
"""
from __future__ import annotations

import copy
import gc
import hashlib
import io
import json
import os
import runpy
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import warnings

VERSION = "0.1"
ENV_FD = "SD_REST_WORKER_FD"
# Diagnostic switch: SD_REST_WORKER_ALIAS=0 keeps the cached torch.load result as read instead of
# pointing its tensors at the model's (costs a second copy of the weights; see NOTES.md).
ALIAS_CHECKPOINT = os.environ.get("SD_REST_WORKER_ALIAS", "1") != "0"
# Diagnostic switch: SD_REST_WORKER_GENERATOR=replay|rebuild skips the faster methods (tests of
# the fallbacks); replay is still checked against the first build before it is used.
FORCE_GENERATOR = os.environ.get("SD_REST_WORKER_GENERATOR", "")

# ---------------------------------------------------------------------------------------------
# Mersenne Twister (torch's CPU generator) jump-ahead
#
# torch's CPU generator is MT19937 (aten/src/ATen/core/MT19937RNGEngine.h). Its 624-word block is
# a window of the untempered word sequence x_k, with x_{k+624} = x_{k+397} ^ twist(x_k, x_{k+1}).
# That recurrence is linear over GF(2) with a primitive characteristic polynomial phi of degree
# 19937, so for any J: x_{s+J+j} = XOR_i g_i x_{s+1+i+j} with g = x^(J-1) mod phi (the shift by
# one keeps x_s's 31 dead low bits out). phi comes from Berlekamp-Massey on 2*19937 output bits
# (0.06 s, once); x^(J-1) mod phi by square-and-multiply on Python ints (~0.02 s); the XOR of
# ~10k slices of 624 words with numpy (~0.01 s).

_MT_N, _MT_M, _MT_D = 624, 397, 19937
_MT_UPPER, _MT_LOWER, _MT_A = 0x80000000, 0x7FFFFFFF, 0x9908B0DF
_STATE_HEAD = "<Qiiq"  # the_initial_seed, left, seeded, next   (THGeneratorState, legacy pod)
_STATE_ARRAY_OFFSET = 24  # then uint64 state[624], normal_x/y/rho, normal_is_valid, float cache


def _mt_extend(np, window, count):
    """The untempered words window[0..623] followed by the next `count` words."""
    x = np.empty(_MT_N + count, dtype=np.uint32)
    x[:_MT_N] = window
    k0, end, step = _MT_N, _MT_N + count, _MT_N - _MT_M
    while k0 < end:  # chunks of 227: every input of a chunk lies before it
        k1 = min(k0 + step, end)
        y = (x[k0 - _MT_N:k1 - _MT_N] & _MT_UPPER) | (x[k0 - _MT_N + 1:k1 - _MT_N + 1] & _MT_LOWER)
        mag = np.where(y & 1, np.uint32(_MT_A), np.uint32(0))
        x[k0:k1] = x[k0 - step:k1 - step] ^ (y >> 1) ^ mag
        k0 = k1
    return x


def _popcount(v):
    # int.bit_count is 3.10+; the fork's interpreter may be 3.8 or 3.9
    return v.bit_count() if hasattr(v, "bit_count") else bin(v).count("1")


def _berlekamp_massey(bits):
    """Connection polynomial C (bit i = c_i, c_0 = 1) and linear complexity of a GF(2) sequence."""
    n = len(bits)
    seq = int("".join("1" if b else "0" for b in bits), 2)  # bit n-1-k holds s_k
    c, b, length, m = 1, 1, 0, -1
    for i in range(n):
        if _popcount(c & (seq >> (n - 1 - i))) & 1:
            t = c
            c ^= b << (i - m)
            if 2 * length <= i:
                length, m, b = i + 1 - length, i, t
    return c, length


_SPREAD = [int("".join("0" + ch for ch in format(v, "08b")), 2).to_bytes(2, "little") for v in range(256)]


class MersenneJump:
    """Advances a serialized torch CPU generator state by W 32-bit words without drawing them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._phi = None  # type: int | None
        self._table = None
        self._powers = {}  # J -> x^(J-1) mod phi

    def _setup(self, np):
        with self._lock:
            if self._phi is not None:
                return
            seed_window = np.arange(1, _MT_N + 1, dtype=np.uint32) * np.uint32(2654435761)
            x = _mt_extend(np, seed_window, 2 * _MT_D + 8)
            c, length = _berlekamp_massey((x[1:1 + 2 * _MT_D] & 1).astype(bool).tolist())
            if length != _MT_D:
                raise RuntimeError("MT19937 characteristic polynomial not found")
            phi = int(format(c, "0%db" % (length + 1))[::-1], 2)  # x^L C(1/x)
            table = {}
            for q in range(256):  # multiples of phi, indexed by their top byte, for reduction
                p = 0
                for i in range(8):
                    if q >> i & 1:
                        p ^= phi << i
                table[p >> _MT_D] = p
            self._phi, self._table = phi, table

    def _reduce(self, r):
        while True:
            bl = r.bit_length()
            if bl <= _MT_D:
                return r
            shift = max(bl - _MT_D - 8, 0)
            r ^= self._table[r >> (_MT_D + shift)] << shift

    def _square(self, a):
        data = a.to_bytes((a.bit_length() + 7) // 8 or 1, "little")
        return int.from_bytes(b"".join([_SPREAD[v] for v in data]), "little")

    def _power(self, j):
        """x^(j-1) mod phi, memoized: j depends only on the plan and the start offset."""
        g = self._powers.get(j)
        if g is None:
            r = 1
            for bit in bin(j - 1)[2:]:
                r = self._reduce(self._square(r))
                if bit == "1":
                    r <<= 1
                    if r >> _MT_D:
                        r ^= self._phi
            g = self._powers[j] = r
        return g

    def advance(self, np, state, words):
        # type: (object, bytes, int) -> bytes
        if words == 0:
            return state
        self._setup(np)
        seed, left, seeded, nxt = struct.unpack_from(_STATE_HEAD, state, 0)
        window = np.frombuffer(state, dtype="<u8", count=_MT_N, offset=_STATE_ARRAY_OFFSET).astype(np.uint32)
        start = _MT_N if left == 1 else nxt  # offset (in this block) of the next word; left==1: next block
        last = start + words - 1
        blocks = last // _MT_N
        new_next = last - blocks * _MT_N + 1
        if blocks:
            j = _MT_N * blocks
            g = self._power(j)
            x = _mt_extend(np, window, _MT_D + _MT_N + 1)[1:]
            bits = np.unpackbits(np.frombuffer(g.to_bytes((_MT_D + 8) // 8, "little"), dtype=np.uint8),
                                 bitorder="little")
            acc = np.zeros(_MT_N, dtype=np.uint32)
            for i in np.flatnonzero(bits).tolist():
                acc ^= x[i:i + _MT_N]
            window = acc
        out = bytearray(state)
        struct.pack_into(_STATE_HEAD, out, 0, seed, _MT_N + 1 - new_next, seeded, new_next)
        out[_STATE_ARRAY_OFFSET:_STATE_ARRAY_OFFSET + 8 * _MT_N] = window.astype("<u8").tobytes()
        return bytes(out)


MT_JUMP = MersenneJump()


def _state_bytes(t):
    return t.numpy().tobytes()


def _state_tensor(torch, data):
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------
# Recording a model build's draws from the default CPU generator


class RngOp:
    """One RNG-consuming aten call seen during a build: enough to count or replay its draws."""

    __slots__ = ("func", "name", "dtype", "size", "stride", "contiguous", "args")

    def __init__(self, func, tensor, args):
        self.func = func
        self.name = str(func)
        self.dtype = tensor.dtype
        self.size = tuple(tensor.shape)
        self.stride = tuple(tensor.stride())
        self.contiguous = tensor.is_contiguous()
        self.args = args  # the op's scalar arguments (bounds, mean/std, ...)

    def numel(self):
        n = 1
        for s in self.size:
            n *= s
        return n


def _op_words(torch, op):
    """32-bit words the op draws, or None if that is not a fixed function of its shape.

    Rules observed on torch's CPU kernels (checked against the real build before use):
    uniform_: one word per element (two for float64, which draws random64); normal_ on a
    contiguous tensor of >= 16 elements takes the vectorised path: float32/float64 draw one
    uniform per element plus 16 more for a partial last group; half/bfloat16 round up to 16.
    Smaller or strided normal_ uses Box-Muller with a cached second sample: not counted."""
    n = op.numel()
    wide = 2 if op.dtype == torch.float64 else 1
    if op.name == "aten.uniform_.default" and op.dtype.is_floating_point:
        return n * wide
    if op.name == "aten.normal_.default" and op.contiguous and n >= 16:
        if op.dtype in (torch.float32, torch.float64):
            return (n + (16 if n % 16 else 0)) * wide
        if op.dtype in (torch.float16, torch.bfloat16):
            return (n + 15) // 16 * 16
    return None


def _make_recorder(torch):
    """A TorchDispatchMode that records default-CPU-generator draws, or None if unavailable."""
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
    except Exception:
        return None
    aten = torch.ops.aten
    replayable = set()
    for name, overload in (("uniform_", "default"), ("normal_", "default"), ("random_", "default"),
                           ("random_", "from"), ("random_", "to"), ("bernoulli_", "float"),
                           ("exponential_", "default"), ("cauchy_", "default"),
                           ("log_normal_", "default"), ("geometric_", "default")):
        try:
            replayable.add(getattr(getattr(aten, name), overload))
        except AttributeError:
            pass
    # Ops that turn a tensor into a Python value: if one reads random data, what the build does
    # next may depend on the draws (e.g. trunc_normal_'s rejection loop), so the draw sequence
    # may differ per seed and must not be replayed.
    to_python = set()
    for name in ("_local_scalar_dense", "is_nonzero", "equal", "item"):
        try:
            to_python.add(getattr(aten, name).default)
        except AttributeError:
            pass
    # Base names of ops that draw even when their overload has no `generator` argument
    # (aten.randn.default, native_dropout, ...): recorded as unsupported, never silently missed.
    rng_names = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like",
                 "normal", "multinomial", "bernoulli", "poisson", "binomial", "native_dropout",
                 "_fused_dropout", "dropout", "feature_dropout", "alpha_dropout", "rrelu",
                 "rrelu_with_noise", "_standard_gamma", "_sample_dirichlet", "uniform", "random",
                 "exponential", "cauchy", "log_normal", "geometric"}
    default_gen = torch.default_generator
    gen_positions = {}  # func -> index of its `generator` argument, -1 none, -2 RNG without one

    def generator_position(func):
        pos = gen_positions.get(func)
        if pos is None:
            pos = -1
            for i, a in enumerate(func._schema.arguments):
                if a.name == "generator":
                    pos = i
            if pos == -1 and func._schema.name.split("::")[-1].rstrip("_") in rng_names:
                pos = -2
            gen_positions[func] = pos
        return pos

    def storage_key(t):
        try:
            if t.device.type == "meta":
                return None
            storage = t.untyped_storage() if hasattr(t, "untyped_storage") else t.storage()  # torch < 2.0
            return (t.device.type, storage.data_ptr())
        except Exception:
            return None

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []  # RngOp, in call order
            self.unsupported = []  # names of RNG ops that can be neither counted nor replayed
            self.data_dependent = False
            self._tainted = set()  # storages holding (or derived from) random data

        def _consumes_default_cpu(self, func, args, kwargs):
            gen_pos = generator_position(func)
            if gen_pos == -1:
                return False
            if gen_pos >= 0:
                gen = kwargs.get("generator", args[gen_pos] if gen_pos < len(args) else None)
                if gen is not None and gen is not default_gen:
                    return False
            t = args[0] if args and isinstance(args[0], torch.Tensor) else None
            device = t.device if t is not None else kwargs.get("device")
            return device is None or torch.device(device).type == "cpu"

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            keys = [storage_key(t) for t in inputs]
            tainted_in = any(k is not None and k in self._tainted for k in keys)
            draws = self._consumes_default_cpu(func, args, kwargs)
            if draws:
                if func in replayable and set(kwargs) <= {"generator"}:
                    self.ops.append(RngOp(func, args[0], tuple(args[1:])))
                else:
                    self.unsupported.append(str(func))
            out = func(*args, **kwargs)
            if func in to_python and tainted_in:
                self.data_dependent = True
            if draws or tainted_in:
                outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
                if draws and args and isinstance(args[0], torch.Tensor):
                    outs.append(args[0])
                for o in outs:
                    k = storage_key(o)
                    if k is not None:
                        self._tainted.add(k)
            return out

    return Recorder()


def _replay(torch, ops, state):
    """The generator state after drawing what `ops` drew, starting from `state`, on a private
    generator and one scratch buffer per dtype, viewed with each op's own sizes and strides (the
    CPU kernels pick their path, hence their draw count, from dtype, numel and contiguity)."""
    gen = torch.Generator(device="cpu")
    gen.set_state(_state_tensor(torch, state))
    extent = {}
    for op in ops:
        need = 1 + sum((s - 1) * st for s, st in zip(op.size, op.stride)) if op.numel() else 0
        extent[op.dtype] = max(extent.get(op.dtype, 0), need)
    scratch = {dt: torch.empty(n, dtype=dt) for dt, n in extent.items()}
    for op in ops:
        if not op.numel():
            continue
        view = scratch[op.dtype].as_strided(op.size, op.stride)
        op.func(view, *op.args, generator=gen)
    return _state_bytes(gen.get_state())


class GeneratorPlan:
    """How to leave the CPU generator where the recorded build left it, from any start state."""

    def __init__(self, torch, recorder, s0, s1, other_rng_changed):
        self.torch = torch
        self.s0, self.s1 = s0, s1
        self.ops = list(recorder.ops) if recorder is not None else []
        reasons = []
        if recorder is None:
            reasons.append("no TorchDispatchMode")
        else:
            if recorder.unsupported:
                reasons.append("unsupported RNG ops: %s" % sorted(set(recorder.unsupported)))
            if recorder.data_dependent:
                reasons.append("random data read back during the build")
        if other_rng_changed:
            reasons.append("build drew from python random/numpy: %s" % other_rng_changed)
        self.reasons = reasons
        self.words = None
        if not reasons:
            counts = [_op_words(torch, op) for op in self.ops]
            if all(c is not None for c in counts):
                self.words = sum(counts)
        self.mode = "rebuild" if reasons else None  # None: not decided yet
        self.check_seconds = None
        self._thread = None
        self._prepared = {}  # start state -> end state (from "prepare")

    def decide(self):
        """Pick jump, replay or rebuild by checking each against the first build's real states.
        Jump is checked inline (~0.1 s); replay, only needed when jump does not apply, runs in a
        background thread (torch releases the GIL) and is joined at the next reuse."""
        if self.mode is not None:
            return
        if FORCE_GENERATOR == "rebuild":
            self.mode = "rebuild"
            return
        if self.words is not None and FORCE_GENERATOR != "replay":
            t = time.perf_counter()
            try:
                ok = self._jump(self.s0) == self.s1
            except Exception:
                ok = False
            self.check_seconds = time.perf_counter() - t
            if ok:
                self.mode = "jump"
                return
        self._thread = threading.Thread(target=self._decide_replay, name="sd-rest-replay-check", daemon=True)
        self._thread.start()

    def _decide_replay(self):
        t = time.perf_counter()
        try:
            ok = _replay(self.torch, self.ops, self.s0) == self.s1
        except Exception:
            ok = False
        self.check_seconds = time.perf_counter() - t
        self.mode = "replay" if ok else "rebuild"

    def _jump(self, state):
        import numpy as np
        return MT_JUMP.advance(np, state, self.words)

    def wait(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def end_state(self, start):
        # type: (bytes) -> tuple
        """(end state, method), or (None, "rebuild") when only a real build will do."""
        self.wait()
        if start == self.s0:
            return self.s1, "same-seed"
        if start in self._prepared:
            return self._prepared[start], "prepared"
        if self.mode == "jump":
            return self._jump(start), "jump"
        if self.mode == "replay":
            return _replay(self.torch, self.ops, start), "replay"
        return None, "rebuild"

    def prepare(self, start):
        """Background: compute the end state for a start state expected soon."""
        self.wait()
        if self.mode not in ("jump", "replay") or start in self._prepared or start == self.s0:
            return
        end = self._jump(start) if self.mode == "jump" else _replay(self.torch, self.ops, start)
        if len(self._prepared) >= 16:
            self._prepared.pop(next(iter(self._prepared)))
        self._prepared[start] = end


# ---------------------------------------------------------------------------------------------
# Per-run state and the caches


class Job:
    """What one run did to the caches (reset at each run)."""

    def __init__(self, job_id):
        self.id = job_id
        self.model = None  # "hit" | "built"
        self.generator = None  # how the generator was kept in step on a hit
        self.checkpoint = None  # "hit" | "read"
        self.evicted = False
        self.handed_out = False  # the resident model was given to this run
        self.loaded = {}  # id(state_dict) -> (ckpt key, container, state_dict), torch.load results
        self.pending_alias = None  # (ckpt key, container, state_dict) fully loaded into the model


class Resident:
    """The one model kept between runs."""

    def __init__(self, key, model, plan, output, flags, build_config):
        self.key = key
        self.model = model
        self.plan = plan
        self.output = output  # what the build printed, printed again on reuse (log parity)
        self.flags = flags  # [(module, training)] right after the build
        self.build_config = build_config
        self.weights_from = None  # checkpoint key whose weights the model holds exactly
        self.checkpoint = None  # (key, container): the torch.load result, aliased to the model
        self.params = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else 0


class _Tee:
    """sys.stdout during a build: writes through and keeps a copy. Not an io.TextIOBase: that
    would answer isatty()/fileno() itself instead of passing them to the real stream."""

    def __init__(self, stream):
        self._stream = stream
        self.copy = io.StringIO()

    def write(self, s):
        self.copy.write(s)
        return self._stream.write(s)

    def flush(self):
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _checkpoint_key(f, args, kwargs):
    """(real path, size, mtime_ns, inode, load options) for a path argument, else None."""
    if isinstance(f, bytes):
        f = os.fsdecode(f)
    if not isinstance(f, (str, os.PathLike)):
        return None
    try:
        real = os.path.realpath(os.fspath(f))
        st = os.stat(real)
        options = repr((args, sorted(kwargs.items())))
    except Exception:
        return None
    return (real, st.st_size, st.st_mtime_ns, st.st_ino, options)


def _config_key(config):
    try:
        omegaconf = sys.modules.get("omegaconf")
        if omegaconf is not None and isinstance(config, omegaconf.DictConfig):
            data = omegaconf.OmegaConf.to_container(config, resolve=True)
        else:
            data = config
        text = json.dumps(data, sort_keys=True, default=repr)
    except Exception:
        return None
    return hashlib.sha256(text.encode()).hexdigest()


class Caches:
    def __init__(self):
        self.resident = None  # type: Resident | None
        self.job = None  # type: Job | None
        self.build_depth = 0
        self.pretrained = {}  # from_pretrained key -> object
        self.real_instantiate = None

    # -- model -----------------------------------------------------------------------------
    def instantiate(self, real, config):
        """The top-level instantiate_from_config of a run; nested calls pass straight through."""
        if self.job is None or self.build_depth:
            return self._build_plain(real, config)
        key = _config_key(config)
        res = self.resident
        if key is not None and res is not None and res.key == key and res.weights_from is not None:
            return self._reuse(real, config, res)
        if res is not None:
            self.evict()
        if key is None:
            return self._build_plain(real, config)
        return self._build_recorded(real, config, key)

    def _build_plain(self, real, config):
        self.build_depth += 1
        try:
            return real(config)
        finally:
            self.build_depth -= 1

    def _other_rng_states(self):
        import random
        states = {"random": random.getstate()}
        np = sys.modules.get("numpy")
        if np is not None:
            s = np.random.get_state()
            states["numpy"] = (s[0], s[1].tobytes(), s[2], s[3], s[4])
        return states

    def _build_recorded(self, real, config, key):
        import torch
        s0 = _state_bytes(torch.get_rng_state())
        other0 = self._other_rng_states()
        recorder = _make_recorder(torch)
        tee = _Tee(sys.stdout)
        saved_stdout, sys.stdout = sys.stdout, tee
        self.build_depth += 1
        try:
            if recorder is not None:
                try:
                    with recorder:
                        model = real(config)
                except Exception as exc:
                    # The recorder itself may be what failed: start again from the same generator
                    # states without it (exactly what a run by hand does), and never reuse.
                    if isinstance(exc, (KeyboardInterrupt, MemoryError)):
                        raise
                    torch.set_rng_state(_state_tensor(torch, s0))
                    self._restore_other_rng(other0)
                    recorder = None
                    model = real(config)
            else:
                model = real(config)
        finally:
            self.build_depth -= 1
            sys.stdout = saved_stdout
        s1 = _state_bytes(torch.get_rng_state())
        other1 = self._other_rng_states()
        changed = [k for k in other0 if other0[k] != other1.get(k)]
        plan = GeneratorPlan(torch, recorder, s0, s1, changed)
        plan.decide()
        flags = [(m, m.training) for m in model.modules()] if hasattr(model, "modules") else []
        self.resident = Resident(key, model, plan, tee.copy.getvalue(), flags, config)
        self.job.model = "built"
        self.job.handed_out = True
        return model

    def _restore_other_rng(self, states):
        import random
        random.setstate(states["random"])
        np = sys.modules.get("numpy")
        if np is not None and "numpy" in states:
            s = states["numpy"]
            np.random.set_state((s[0], np.frombuffer(s[1], dtype=np.uint32).copy(), s[2], s[3], s[4]))

    def _reuse(self, real, config, res):
        import torch
        start = _state_bytes(torch.get_rng_state())
        end, how = res.plan.end_state(start)
        if end is None:
            # last resort: the real constructor again, result dropped (it prints as it builds)
            self._build_plain(real, config)
        else:
            torch.set_rng_state(_state_tensor(torch, end))
            sys.stdout.write(res.output)
        for module, training in res.flags:
            module.training = training
        self.job.model, self.job.generator, self.job.handed_out = "hit", how, True
        return res.model

    def evict(self):
        if self.resident is not None:
            self.resident = None
            if self.job is not None:
                self.job.evicted = True
            collect_garbage(full=True)
            _release_device_memory()

    # -- torch.load ------------------------------------------------------------------------
    def torch_load(self, real, f, args, kwargs):
        job, res = self.job, self.resident
        key = _checkpoint_key(f, args, kwargs) if job is not None and not self.build_depth else None
        if key is None:
            return real(f, *args, **kwargs)
        if res is not None and res.checkpoint is not None and res.weights_from == key and res.checkpoint[0] == key:
            container = _copy_container(res.checkpoint[1])
            job.checkpoint = "hit"
            self._note_loaded(key, container)
            return container
        result = real(f, *args, **kwargs)
        job.checkpoint = "read"
        self._note_loaded(key, result)
        return result

    def _note_loaded(self, key, container):
        sd = container.get("state_dict") if isinstance(container, dict) else None
        if isinstance(sd, dict):
            self.job.loaded[id(sd)] = (key, container, sd)
        elif isinstance(container, dict):
            self.job.loaded[id(container)] = (key, container, container)

    def load_state_dict(self, real, module, state_dict, args, kwargs):
        res, job = self.resident, self.job
        if res is None or job is None or module is not res.model:
            return real(module, state_dict, *args, **kwargs)
        origin = job.loaded.get(id(state_dict))
        res.weights_from = None  # until this load completes
        job.pending_alias = None
        result = real(module, state_dict, *args, **kwargs)
        missing = getattr(result, "missing_keys", None)
        if missing is None and isinstance(result, tuple):
            missing = result[0]
        if origin is not None and not missing:
            res.weights_from = origin[0]
            job.pending_alias = origin
        return result

    # -- from_pretrained (safety checker, feature extractor) -------------------------------
    def from_pretrained(self, real, cls, args, kwargs):
        if self.build_depth or self.job is None:
            return real(cls, *args, **kwargs)
        key = _pretrained_key(cls, args, kwargs)
        if key is None:
            return real(cls, *args, **kwargs)
        obj = self.pretrained.get(key)
        if obj is None:
            obj = self.pretrained[key] = real(cls, *args, **kwargs)
        return obj

    # -- end of a run ----------------------------------------------------------------------
    def end_job(self, ok):
        job, res = self.job, self.resident
        if res is None or job is None:
            self.job = None
            return
        if job.handed_out:
            _repair_ema(res.model, ok)
            if res.weights_from is None:
                # built here and never (completely) loaded, or a load was cut short
                self.evict()
            elif job.pending_alias is not None and job.pending_alias[0] == res.weights_from:
                if ALIAS_CHECKPOINT:
                    res.checkpoint = (res.weights_from, _alias_container(res.model, job.pending_alias))
                else:  # diagnostic: keep the torch.load result as read (a second copy of the weights)
                    res.checkpoint = (res.weights_from, job.pending_alias[1])
            elif res.checkpoint is not None and res.checkpoint[0] != res.weights_from:
                res.checkpoint = None
        job.loaded.clear()
        job.pending_alias = None
        self.job = None


def _pretrained_key(cls, args, kwargs):
    try:
        ident = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        where = None
        if isinstance(ident, (str, os.PathLike)) and os.path.isdir(ident):
            real = os.path.realpath(ident)
            where = (real, sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in os.scandir(real)))
        return repr((cls.__module__, cls.__qualname__, args, sorted(kwargs.items()), where))
    except Exception:
        return None


def _copy_container(container):
    """A fresh top-level dict (and state_dict dict) around the same tensors, so that a script
    that pops or adds keys cannot damage the cached copy."""
    if not isinstance(container, dict):
        return container
    # copy.copy keeps the OrderedDict type and its `_metadata` (per-module versions that
    # load_state_dict passes to _load_from_state_dict, which may convert legacy layouts)
    out = copy.copy(container)
    if isinstance(out.get("state_dict"), dict):
        out["state_dict"] = copy.copy(out["state_dict"])
    return out


def _alias_container(model, origin):
    """The torch.load result with every state_dict tensor the model holds replaced by the model's
    own tensor (same values, no second copy). Entries the model does not have (unexpected keys,
    ignored by load_state_dict(strict=False)) become empty tensors of their dtype."""
    import torch
    key, container, sd = origin
    own = model.state_dict()
    new_sd = copy.copy(sd)  # same type, order and `_metadata` as what torch.load returned
    for k, v in sd.items():
        mine = own.get(k)
        if mine is not None and isinstance(v, torch.Tensor) and mine.shape == v.shape:
            new_sd[k] = mine
        elif isinstance(v, torch.Tensor):
            new_sd[k] = torch.empty(0, dtype=v.dtype)
        else:
            new_sd[k] = v
    if container is sd:
        return new_sd
    out = copy.copy(container)
    out["state_dict"] = new_sd
    return out


def _repair_ema(model, ok):
    """ldm's ema_scope() stores the weights, copies the EMA weights in, and restores in a
    `finally`. An interrupt can land before its `try` or cut a copy short, leaving EMA (or mixed)
    weights in the cached model. LitEma.store() assigns collected_params only once its clones are
    complete, so restoring from non-empty collected_params after a failed run is always right.
    Clearing them after every run also frees the clones (a full copy of the UNet) that ldm
    otherwise keeps until the next store()."""
    ema = getattr(model, "model_ema", None)
    inner = getattr(model, "model", None)
    if ema is None or inner is None or not hasattr(ema, "collected_params"):
        return
    if ema.collected_params and not ok:
        ema.restore(inner.parameters())
    ema.collected_params = []


def _release_device_memory():
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:
        pass
    try:
        mps = getattr(torch, "mps", None)
        if mps is not None and hasattr(mps, "empty_cache") and torch.backends.mps.is_available():
            mps.empty_cache()
    except Exception:
        pass
    if sys.platform.startswith("linux"):
        try:  # glibc keeps freed heap pages; give them back so RSS reflects what is alive
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except Exception:
            pass


CACHES = Caches()

_GC = {"frozen": False, "since_full": 0}
FULL_COLLECT_EVERY = 20  # jobs


def collect_garbage(full=False):
    """gc.collect() after each job, cheaply. A plain collection walks every object torch,
    transformers and the model made (0.2 s a job on the kit); gc.freeze() moves the survivors out
    of the collector's sight, so later collections only walk what the last job made. Frozen
    objects are still freed by reference counting; cycles among them (an evicted model's, say)
    wait for the full collection done on eviction and every FULL_COLLECT_EVERY jobs."""
    _GC["since_full"] += 1
    if full or _GC["since_full"] >= FULL_COLLECT_EVERY:
        gc.unfreeze()
        _GC["since_full"] = 0
    gc.collect()
    gc.freeze()

# ---------------------------------------------------------------------------------------------
# Patches, applied when the scripts import the modules (the driver imports none of them)


def _patch_torch(torch):
    real_load = torch.load

    def load(f, *args, **kwargs):
        return CACHES.torch_load(real_load, f, args, kwargs)

    load.__wrapped__ = real_load
    load.__doc__ = real_load.__doc__
    torch.load = load
    module_cls = torch.nn.Module
    real_lsd = module_cls.load_state_dict

    def load_state_dict(self, state_dict, *args, **kwargs):
        return CACHES.load_state_dict(real_lsd, self, state_dict, args, kwargs)

    load_state_dict.__wrapped__ = real_lsd
    module_cls.load_state_dict = load_state_dict


def _patch_ldm_util(module):
    real = module.instantiate_from_config
    if getattr(real, "_sd_rest_wrapped", False):
        return

    def instantiate_from_config(config):
        return CACHES.instantiate(real, config)

    instantiate_from_config._sd_rest_wrapped = True
    instantiate_from_config.__wrapped__ = real
    CACHES.real_instantiate = real
    module.instantiate_from_config = instantiate_from_config


def _patch_from_pretrained(cls):
    real = cls.from_pretrained.__func__  # the classmethod's function (possibly inherited)

    def from_pretrained(klass, *args, **kwargs):
        if klass is not cls:
            return real(klass, *args, **kwargs)
        return CACHES.from_pretrained(real, klass, args, kwargs)

    cls.from_pretrained = classmethod(from_pretrained)


def _patch_safety_checker(module):
    _patch_from_pretrained(module.StableDiffusionSafetyChecker)


def _patch_feature_extraction_auto(module):
    _patch_from_pretrained(module.AutoFeatureExtractor)


_IMPORT_PATCHES = {
    "torch": _patch_torch,
    "ldm.util": _patch_ldm_util,
    "diffusers.pipelines.stable_diffusion.safety_checker": _patch_safety_checker,
    "transformers.models.auto.feature_extraction_auto": _patch_feature_extraction_auto,
}


def _install_import_patches():
    import importlib.abc
    import importlib.util

    class PatchingLoader(importlib.abc.Loader):
        def __init__(self, loader, patch):
            self._loader, self._patch = loader, patch

        def create_module(self, spec):
            return self._loader.create_module(spec)

        def exec_module(self, module):
            self._loader.exec_module(module)
            self._patch(module)

        def __getattr__(self, name):
            return getattr(self._loader, name)

    busy = threading.local()  # names being resolved: other wrapping finders (the kit's
    # bfirsh_sd_cpu_compat) ask every finder too, us included; answer None to those nested asks

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            patch = _IMPORT_PATCHES.get(fullname)
            names = getattr(busy, "names", None)
            if names is None:
                names = busy.names = set()
            if patch is None or fullname in names:
                return None
            names.add(fullname)
            try:
                for finder in sys.meta_path:
                    if finder is self or not hasattr(finder, "find_spec"):
                        continue
                    spec = finder.find_spec(fullname, path, target)
                    if spec is not None:
                        if spec.loader is not None:
                            spec.loader = PatchingLoader(spec.loader, patch)
                        return spec
                return None
            finally:
                names.discard(fullname)

    for name, patch in _IMPORT_PATCHES.items():  # already imported (e.g. by a .pth file)
        if name in sys.modules:
            patch(sys.modules[name])
    sys.meta_path.insert(0, Finder())


# ---------------------------------------------------------------------------------------------
# Running one script


class RunState:
    """What a script run may change in the interpreter, taken before and put back after."""

    def __init__(self):
        self.argv = list(sys.argv)
        self.path = list(sys.path)
        self.cwd = os.getcwd()
        self.environ = dict(os.environ)
        self.filters = list(warnings.filters)
        self.showwarning = warnings.showwarning
        self.stdout, self.stderr = sys.stdout, sys.stderr
        self.sigint = signal.getsignal(signal.SIGINT)
        self.torch = None
        torch = sys.modules.get("torch")
        if torch is not None:
            self.torch = (torch.is_grad_enabled(), torch.get_default_dtype(), torch.get_num_threads())

    def restore(self):
        sys.argv[:] = self.argv
        sys.path[:] = self.path
        try:
            os.chdir(self.cwd)
        except OSError:
            pass
        for k in list(os.environ):
            if k not in self.environ:
                del os.environ[k]
        for k, v in self.environ.items():
            if os.environ.get(k) != v:
                os.environ[k] = v
        warnings.filters[:] = self.filters
        warnings.showwarning = self.showwarning
        _reset_warning_registries()
        sys.stdout, sys.stderr = self.stdout, self.stderr
        signal.signal(signal.SIGINT, self.sigint)
        torch = sys.modules.get("torch")
        if torch is not None:
            grad, dtype, threads = self.torch or (True, torch.float32, torch.get_num_threads())
            torch.set_grad_enabled(grad)
            torch.set_default_dtype(dtype)
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)


def _reset_warning_registries():
    """A run by hand shows each 'default'/'once' warning again; so should the next job's log."""
    mutated = getattr(warnings, "_filters_mutated", None) or getattr(warnings, "_filters_mutated_lock_held", None)
    if mutated is not None:
        try:
            mutated()
        except Exception:
            pass


class WorkerState:
    def __init__(self):
        self.in_script = False
        self.busy = False
        self.job_id = None
        self.jobs = 0
        self.started = time.time()
        self.base_path = []


STATE = WorkerState()


def _on_sigint(signum, frame):
    # The default handler's behaviour, but only while a script runs: an interrupt that arrives
    # after the script ended (the server's cancel racing with the job's end) must not hit the
    # driver's own bookkeeping.
    if STATE.in_script:
        raise KeyboardInterrupt


def _script_traceback(tb, script):
    """Drop the driver's and runpy's frames, so the traceback reads as Python prints it for
    `python script.py`."""
    t = tb
    while t is not None and t.tb_frame.f_code.co_filename != script:
        t = t.tb_next
    return t


def _print_exception(exc, script):
    tb = _script_traceback(exc.__traceback__, script)
    try:
        sys.stderr.flush()
        sys.stdout.flush()
    except Exception:
        pass
    traceback.print_exception(type(exc), exc, tb, file=sys.__stderr__ if sys.stderr is None else sys.stderr)


def _through_import(tb):
    """Did the exception pass through the import machinery? Then a package may be half
    imported (its submodules kept in sys.modules, the package itself dropped): not worth
    trusting for the next job."""
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        tb = tb.tb_next
    return False


def _is_oom(exc):
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text)


def _close_leftover_bars():
    """A script that raised leaves its tqdm bars open (its frames hold them). A run by hand
    closes them at interpreter exit; do it now so their last output belongs to this job and the
    next job's bars start at position 0 again."""
    tqdm_mod = sys.modules.get("tqdm")
    cls = getattr(tqdm_mod, "tqdm", None)
    instances = getattr(cls, "_instances", None)
    if not instances:
        return
    for bar in sorted(list(instances), key=lambda b: -getattr(b, "pos", 0)):
        try:
            bar.close()
        except Exception:
            pass


def run_job(msg, send):
    job_id = msg.get("job")
    script = msg["script"]
    argv = [str(a) for a in msg.get("argv", [])]
    cwd = msg.get("cwd") or os.getcwd()
    seed = msg.get("seed")
    if not os.path.isfile(script):
        # what `python missing.py` does: one line on stderr, exit status 2
        print("%s: can't open file %r: [Errno 2] No such file or directory" % (sys.executable, script),
              file=sys.stderr)
        send({"event": "started", "job": job_id})
        send({"event": "finished", "job": job_id, "outcome": "error", "exit_code": 2,
              "error": "no such script: %s" % script, "oom": False, "seconds": 0.0, "cache": None})
        return
    saved = RunState()
    STATE.busy, STATE.job_id = True, job_id
    CACHES.job = Job(job_id)
    cache_info = CACHES.job
    outcome, code, error, oom = "ok", 0, None, False
    recycle = None  # why the server should replace this worker after the job, if it should
    t0 = time.perf_counter()
    send({"event": "started", "job": job_id})
    try:
        os.chdir(cwd)
        sys.argv[:] = [script] + argv
        # `python scripts/x.py` puts the script's folder first; the driver's own folder is gone
        sys.path[:] = [os.path.dirname(os.path.abspath(script))] + STATE.base_path
        if seed is not None:
            import torch  # what the server's sitecustomize does at interpreter start
            torch.manual_seed(int(seed))
        try:
            STATE.in_script = True
            try:
                runpy.run_path(script, run_name="__main__")
            finally:
                STATE.in_script = False
        except SystemExit as exc:
            code, outcome = _exit_code(exc)
            if code and not isinstance(exc.code, int) and exc.code is not None:
                print(exc.code, file=sys.stderr)  # as the interpreter does for sys.exit("text")
            error = None if code == 0 else "exit code %d" % code
        except KeyboardInterrupt as exc:
            _print_exception(exc, script)
            outcome, code, error = "interrupted", -int(signal.SIGINT), "interrupted"
            if _through_import(exc.__traceback__):
                recycle = "interrupted during an import"
        except BaseException as exc:  # noqa: B902 - everything a script can raise
            _print_exception(exc, script)
            outcome, code = "error", 1
            error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            oom = _is_oom(exc)
            if oom:
                recycle = "out of memory"
            elif _through_import(exc.__traceback__):
                recycle = "failed during an import"
    except KeyboardInterrupt:
        outcome, code, error = "interrupted", -int(signal.SIGINT), "interrupted"
    finally:
        STATE.in_script = False
        _close_leftover_bars()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        CACHES.end_job(outcome == "ok")
        saved.restore()
        collect_garbage()
        _release_device_memory()
        marker = msg.get("marker")
        if marker:
            os.write(1, str(marker).encode())
        STATE.busy, STATE.job_id = False, None
        STATE.jobs += 1
    send({
        "event": "finished", "job": job_id, "outcome": outcome, "exit_code": code, "error": error,
        "oom": oom, "recycle": recycle, "seconds": round(time.perf_counter() - t0, 3),
        "cache": {"model": cache_info.model, "generator": cache_info.generator,
                  "checkpoint": cache_info.checkpoint, "evicted": cache_info.evicted},
    })


def _exit_code(exc):
    c = exc.code
    if c is None:
        return 0, "ok"
    if isinstance(c, int):
        return c, ("ok" if c == 0 else "error")
    return 1, "error"


# ---------------------------------------------------------------------------------------------
# Status, check, channel, main loop


def _rss():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except Exception:
        pass
    try:  # macOS: no /proc
        import subprocess
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(os.getpid())], capture_output=True, text=True)
        return int(out.stdout.strip()) * 1024
    except Exception:
        return None


def status():
    res = CACHES.resident
    models = []
    if res is not None:
        models.append({"config": res.key[:12], "checkpoint": res.weights_from[0] if res.weights_from else None,
                       "generator": res.plan.mode, "params": res.params,
                       "generator_words": res.plan.words, "generator_check_s": res.plan.check_seconds,
                       "generator_reasons": res.plan.reasons})
    return {"event": "status", "pid": os.getpid(), "rss": _rss(), "busy": STATE.busy, "job": STATE.job_id,
            "jobs": STATE.jobs, "models": models, "uptime": round(time.time() - STATE.started, 1)}


def check():
    """Test aid: do the resident model's weights equal its checkpoint's, bit for bit?"""
    res = CACHES.resident
    if res is None or res.weights_from is None:
        return {"event": "check", "ok": True, "detail": "no resident model"}
    import torch
    path = res.weights_from[0]
    fresh = torch.load.__wrapped__(path, map_location="cpu")
    sd = fresh.get("state_dict", fresh)
    own = res.model.state_dict()
    bad = [k for k, v in sd.items() if k in own and not torch.equal(own[k].cpu(), v.to(own[k].dtype))]
    ema = getattr(res.model, "model_ema", None)
    pending = len(getattr(ema, "collected_params", []) or [])
    shared = 0
    if res.checkpoint is not None:
        cached = res.checkpoint[1]
        cached = cached.get("state_dict", cached) if isinstance(cached, dict) else {}
        shared = sum(1 for k, v in cached.items() if k in own and v.data_ptr() == own[k].data_ptr())
        if getattr(cached, "_metadata", None) != getattr(sd, "_metadata", None):
            bad.append("<state_dict _metadata lost>")
    return {"event": "check", "ok": not bad and not pending,
            "detail": "%d tensors compared, %d differ %s; ema clones kept: %d; cached checkpoint tensors "
                      "sharing the model's storage: %d" % (len(sd), len(bad), bad[:5], pending, shared)}


class Channel:
    def __init__(self, fd):
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(True)
        self._lock = threading.Lock()

    def send(self, obj):
        data = (json.dumps(obj) + "\n").encode()
        with self._lock:
            self.sock.sendall(data)

    def lines(self):
        buf = b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    yield line


def _reader(channel, queue_put):
    """Reader thread: answers status at once, queues what the main thread must do."""
    try:
        for line in channel.lines():
            try:
                msg = json.loads(line)
                op = msg.get("op")
            except Exception as exc:
                channel.send({"event": "error", "error": "bad message: %s" % exc})
                continue
            if op == "status":
                channel.send(status())
            elif op == "prepare":
                threading.Thread(target=_prepare, args=(msg,), daemon=True).start()
            elif op in ("run", "exit", "check"):
                queue_put(msg)
            else:
                channel.send({"event": "error", "error": "unknown op %r" % op})
    except Exception:
        pass
    # EOF: the server is gone. Leave at once, mid-job or not: no orphaned worker.
    os._exit(0)


def _prepare(msg):
    try:
        res = CACHES.resident
        torch = sys.modules.get("torch")
        if res is None or torch is None or msg.get("seed") is None:
            return
        start = _state_bytes(torch.Generator(device="cpu").manual_seed(int(msg["seed"])).get_state())
        res.plan.prepare(start)
    except Exception:
        pass


def main():
    fd = os.environ.get(ENV_FD)
    if not fd:
        print("worker_driver: %s is not set" % ENV_FD, file=sys.stderr)
        return 2
    # `python worker_driver.py` put the driver's folder first on sys.path; a script run by hand
    # would have its own folder there instead (run_job puts it back per run).
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == here:
        del sys.path[0]
    STATE.base_path = list(sys.path)
    channel = Channel(int(fd))
    _install_import_patches()
    signal.signal(signal.SIGINT, _on_sigint)
    import queue
    work = queue.Queue()
    threading.Thread(target=_reader, args=(channel, work.put), name="sd-rest-reader", daemon=True).start()
    channel.send({"event": "ready", "pid": os.getpid(), "python": "%d.%d.%d" % sys.version_info[:3],
                  "driver": VERSION})
    while True:
        msg = work.get()
        op = msg.get("op")
        if op == "exit":
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(0)
        elif op == "check":
            try:
                channel.send(check())
            except Exception as exc:
                channel.send({"event": "check", "ok": False, "detail": repr(exc)})
        elif op == "run":
            try:
                run_job(msg, channel.send)
            except KeyboardInterrupt:  # landed in the driver between runs: nothing to undo
                pass
            except Exception as exc:
                # A failure of the driver itself (not of a script): its state cannot be trusted.
                # Say so and leave; the server replaces the worker (and retries the job).
                traceback.print_exc()
                try:
                    channel.send({"event": "fatal", "job": msg.get("job"), "error": repr(exc)})
                finally:
                    os._exit(70)


if __name__ == "__main__":
    sys.exit(main())

"""The progress parser against byte streams shaped like the real scripts' pty output."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pytest

from sd_rest.runs.progress import Progress, ProgressParser, is_bar_line, last_error

CR = "\r"
ESC = "\x1b"
UP = ESC + "[A"

WARNINGS = (
    "/venv/lib/python3.10/site-packages/lightning_fabric/__init__.py:29: UserWarning: "
    "pkg_resources is deprecated as an API. See https://setuptools.pypa.io/\n"
    '  __import__("pkg_resources").declare_namespace(__name__)\n'
    "Global seed set to 42\n"
)
LOADING = (
    "Loading model from models/ldm/stable-diffusion-v1/model.ckpt\n"
    "Global Step: 470000\n"
    "LatentDiffusion: Running in eps-prediction mode\n"
    "DiffusionWrapper has 859.52 M params.\n"
    "Creating invisible watermark encoder (see https://github.com/ShieldMnt/invisible-watermark)...\n"
)
DONE = "Your samples are ready and waiting for you here: \n/tmp/job/out \n \nEnjoy.\n"


def pty(text: str) -> bytes:
    """What the server reads: both streams through one pty, which turns `\\n` into `\\r\\n`."""
    return text.replace("\n", "\r\n").encode()


def bar(desc: str, n: int, total: int, rate: str = "14.22it/s") -> str:
    filled = 10 * n // total
    cells = "█" * filled + ("▌" if filled < 10 and (100 * n // total) % 10 >= 5 else "")
    pct = 100 * n // total
    eta = "?" if n == 0 else "00:00"
    speed = "?it/s" if n == 0 else rate
    return f"{desc}: {pct:3d}%|{cells:<10}| {n}/{total} [00:00<{eta}, {speed}]"


def nested_txt2img(sampler: str, run_line: str, steps: list[int], total: int, n_iter: int) -> str:
    """txt2img/img2img: `Sampling` > `data` > sampler bar, drawn as tqdm nests them."""
    out = f"{CR}{bar('Sampling', 0, n_iter)}\n{CR}{bar('data', 0, 1)}{UP}"
    for i in range(n_iter):
        if i:
            out += f"{CR}{bar('data', 0, 1)}{UP}"
        out += f"Data shape for DDIM sampling is (1, 4, 64, 64), eta 0.0\n{run_line}\n"
        for n in steps:
            out += f"\n\n{CR}{bar(sampler, n, total)}{UP}{UP}"
        # Closing the sampler repeats its last state at 100%.
        out += f"{CR}{bar(sampler, total, total, '14.68it/s')}\n\n"
        out += f"{CR}{bar('data', 1, 1)}{UP}{CR}{bar('data', 1, 1)}\n"
        last = f"{CR}{bar('Sampling', i + 1, n_iter, '1.53it/s')}"
        out += last + ("\n" if i + 1 < n_iter else last)
    return out


TXT2IMG = pty(
    WARNINGS
    + LOADING
    + nested_txt2img("DDIM Sampler", "Running DDIM Sampling with 8 timesteps", [0, 2, 4, 8], 8, 2)
    + "\n"
    + DONE
)
TXT2IMG_STATES = [
    (0, 0, 0),
    (0, 0, 8),
    (0, 2, 8),
    (0, 4, 8),
    (0, 8, 8),
    (1, 0, 8),
    (1, 2, 8),
    (1, 4, 8),
    (1, 8, 8),
    (2, 0, 8),
]

IMG2IMG = pty(
    WARNINGS
    + LOADING
    + "loaded input image of size (512, 512) from in.png\n"
    + "target t_enc is 6 steps\n"
    + nested_txt2img("Decoding image", "Running DDIM Sampling with 6 timesteps", [0, 3, 6], 6, 2)
    + "\n"
    + DONE
)
IMG2IMG_STATES = [
    (0, 0, 0),
    (0, 0, 6),
    (0, 3, 6),
    (0, 6, 6),
    (1, 0, 6),
    (1, 3, 6),
    (1, 6, 6),
    (2, 0, 6),
]

# 80 steps so that multi-digit counts ("12/80") can be cut mid-number.
PLMS = pty(
    WARNINGS
    + LOADING
    + nested_txt2img(
        "PLMS Sampler", "Running PLMS Sampling with 80 timesteps", [0, 12, 40, 79], 80, 1
    )
    + "\n"
    + DONE
)
PLMS_STATES = [
    (0, 0, 0),
    (0, 0, 80),
    (0, 12, 80),
    (0, 40, 80),
    (0, 79, 80),
    (0, 80, 80),
    (1, 0, 80),
]


def inpaint_stream(images: int, steps: int) -> bytes:
    out = "Found 2 inputs.\n" + LOADING + f"{CR}0it [00:00, ?it/s]"
    for i in range(images):
        out += "Data shape for DDIM sampling is (1, 3, 128, 128), eta 0.0\n"
        out += f"Running DDIM Sampling with {steps} timesteps\n"
        for n in (0, steps // 2, steps):
            out += f"\n{CR}{bar('DDIM Sampler', n, steps)}{UP}"
        out += f"{CR}{bar('DDIM Sampler', steps, steps)}\n"
        out += f"{CR}{i + 1}it [00:0{i}, {4.43 - i:5.2f}it/s]"
    out += f"{CR}{images}it [00:01,  1.20it/s]\n"
    return pty(out)


INPAINT = inpaint_stream(2, 10)
INPAINT_STATES = [
    (0, 0, 0),
    (0, 0, 10),
    (0, 5, 10),
    (0, 10, 10),
    (1, 0, 10),
    (1, 5, 10),
    (1, 10, 10),
    (2, 0, 10),
]

STREAMS = {
    "txt2img": (TXT2IMG, TXT2IMG_STATES),
    "img2img": (IMG2IMG, IMG2IMG_STATES),
    "plms": (PLMS, PLMS_STATES),
    "inpaint": (INPAINT, INPAINT_STATES),
}


def as_tuple(p: Progress) -> tuple[int, int, int]:
    return (p.batches_done, p.step, p.steps_total)


def run(chunks: Iterable[bytes]) -> tuple[ProgressParser, list[tuple[int, int, int]]]:
    parser = ProgressParser()
    seen = []
    for chunk in chunks:
        changed = parser.feed(chunk)
        if changed is not None:
            assert changed == parser.progress
            seen.append(as_tuple(changed))
    parser.finish()
    return parser, seen


def assert_forward(seen: list[tuple[int, int, int]]) -> None:
    for before, after in itertools.pairwise(seen):
        assert after[:2] > before[:2] or (after[:2] == before[:2] and after != before), seen


@pytest.mark.parametrize("name", STREAMS)
def test_whole_stream_ends_at_the_last_state(name: str) -> None:
    stream, states = STREAMS[name]
    parser, seen = run([stream])
    assert parser.progress is not None
    assert as_tuple(parser.progress) == states[-1]
    assert seen == [states[-1]]


@pytest.mark.parametrize("name", STREAMS)
def test_one_byte_at_a_time_sees_every_state_in_order(name: str) -> None:
    stream, states = STREAMS[name]
    parser, seen = run(stream[i : i + 1] for i in range(len(stream)))
    assert seen == states
    whole, _ = run([stream])
    assert parser.progress == whole.progress
    assert parser.recent_lines() == whole.recent_lines()


@pytest.mark.parametrize("name", STREAMS)
def test_any_split_point_gives_the_same_result(name: str) -> None:
    stream, states = STREAMS[name]
    whole, _ = run([stream])
    for cut in range(len(stream) + 1):
        parser, seen = run([stream[:cut], stream[cut:]])
        assert parser.progress == whole.progress, cut
        assert parser.recent_lines() == whole.recent_lines(), cut
        # Every reported state is a real one (no "1/8" read from a cut "12/80"), in order.
        assert set(seen) <= set(states), (cut, seen)
        assert_forward(seen)


def test_plain_lines_are_kept_and_bars_are_not() -> None:
    parser, _ = run([TXT2IMG])
    lines = parser.recent_lines()
    assert lines[:3] == [
        WARNINGS.splitlines()[0],
        WARNINGS.splitlines()[1],
        "Global seed set to 42",
    ]
    assert "Loading model from models/ldm/stable-diffusion-v1/model.ckpt" in lines
    # Printed right after an unterminated `data` bar, yet still its own line.
    assert "Data shape for DDIM sampling is (1, 4, 64, 64), eta 0.0" in lines
    assert lines.count("Running DDIM Sampling with 8 timesteps") == 2
    assert lines[-1] == "Enjoy."
    assert not any(is_bar_line(line) or "\x1b" in line or "█" in line for line in lines)
    assert not any(line != line.rstrip() or not line.strip() for line in lines)


def test_recent_lines_keeps_only_the_last_max_lines() -> None:
    parser = ProgressParser(max_lines=3)
    parser.feed(b"".join(b"line %d\r\n" % i for i in range(10)))
    assert parser.recent_lines() == ["line 7", "line 8", "line 9"]


def test_an_unterminated_redraw_is_seen_at_once() -> None:
    parser = ProgressParser()
    assert parser.progress is None
    assert parser.feed(b"\rSampling:   0%|          | 0/2 [00:00<?, ?it/s]") == Progress(0, 0, 0)
    got = parser.feed("\n\n\rDDIM Sampler:  50%|█████     | 4/8 [00:00<00:00, 14.13it/s]".encode())
    assert got == Progress(0, 4, 8)
    assert parser.progress == Progress(0, 4, 8)


def test_a_redraw_cut_before_its_bracket_is_not_taken_yet() -> None:
    parser = ProgressParser()
    assert parser.feed("\rDDIM Sampler:  25%|██▌       | 2/8".encode()) is None
    assert parser.progress is None
    assert parser.feed(b" [00:00<00:00, 14.22it/s]") == Progress(0, 2, 8)


def test_a_count_cut_mid_number_is_never_read_short() -> None:
    parser = ProgressParser()
    parser.feed(b"\rPLMS Sampler:   0%|          | 0/80 [00:00<?, ?it/s]")
    assert parser.feed("\rPLMS Sampler:  15%|█▌        | 1".encode()) is None
    assert parser.progress == Progress(0, 0, 80)
    assert parser.feed(b"2/8") is None
    assert parser.feed(b"0 [00:01<00:05, 13.0it/s]") == Progress(0, 12, 80)


def test_an_outer_count_cut_mid_number_is_never_read_short() -> None:
    parser = ProgressParser()
    parser.feed(b"\r9it [00:09,  1.00it/s]")
    assert parser.feed(b"\r1") is None
    assert parser.feed(b"0it") is None
    assert parser.feed(b" [00:10,  1.00it/s]") == Progress(10, 0, 0)


def test_a_utf8_character_split_across_chunks_is_not_mangled() -> None:
    data = "\rDDIM Sampler:  25%|██▌       | 2/8 [00:00<00:00, 14.22it/s]\n".encode()
    cut = data.index("█".encode()) + 1
    parser = ProgressParser()
    parser.feed(data[:cut])
    assert parser.feed(data[cut:]) == Progress(0, 2, 8)


def test_progress_never_goes_backwards() -> None:
    parser = ProgressParser()
    parser.feed("\rDDIM Sampler:  50%|█████     | 4/8 [00:00<00:00, 14.13it/s]\n".encode())
    assert (
        parser.feed("\rDDIM Sampler:  25%|██▌       | 2/8 [00:00<00:00, 14.22it/s]\n".encode())
        is None
    )
    assert parser.feed(
        "\rDDIM Sampler: 100%|██████████| 8/8 [00:00<00:00, 14.71it/s]".encode()
    ) == (Progress(0, 8, 8))
    assert (
        parser.feed("\rDDIM Sampler: 100%|██████████| 8/8 [00:00<00:00, 14.68it/s]".encode())
        is None
    )
    assert parser.feed("\rSampling:  50%|█████     | 1/2 [00:00<00:00,  1.53it/s]".encode()) == (
        Progress(1, 0, 8)
    )
    assert parser.feed(b"\rSampling:   0%|          | 0/2 [00:00<?, ?it/s]\n") is None
    assert parser.progress == Progress(1, 0, 8)


def test_data_and_unknown_bars_do_not_count() -> None:
    parser = ProgressParser()
    assert parser.feed("\rdata: 100%|██████████| 1/1 [00:00<00:00,  1.53it/s]\n".encode()) is None
    assert parser.feed("\rDownloading: 100%|██████████| 9/9 [00:00<00:00]\n".encode()) is None
    assert parser.progress is None
    assert parser.recent_lines() == []


def test_ansi_sequences_are_stripped_from_lines() -> None:
    parser = ProgressParser()
    parser.feed(b"\x1b[2K\x1b[31mRuntimeError: boom\x1b[0m\x1b\r\n")
    assert parser.recent_lines() == ["RuntimeError: boom"]


def test_finish_keeps_the_unterminated_tail() -> None:
    parser = ProgressParser()
    parser.feed(b"Traceback (most recent call last):\nKeyboardInterrupt")
    assert parser.recent_lines() == ["Traceback (most recent call last):"]
    parser.finish()
    assert parser.recent_lines() == ["Traceback (most recent call last):", "KeyboardInterrupt"]


def test_fraction() -> None:
    assert Progress(0, 0, 0).fraction == 0.0
    assert Progress(1, 2, 8).fraction == 0.25
    assert Progress(0, 9, 8).fraction == 1.0


def lines_of(text: str) -> list[str]:
    parser = ProgressParser()
    parser.feed(pty(text))
    parser.finish()
    return parser.recent_lines()


INDEX_ERROR = (
    "Running DDIM Sampling with 9 timesteps\n"
    "\n\n\rDDIM Sampler:   0%|          | 0/9 [00:00<?, ?it/s]\x1b[A\x1b[A\n"
    "Traceback (most recent call last):\n"
    '  File "scripts/txt2img.py", line 279, in <module>\n'
    "    main()\n"
    '  File "ldm/models/diffusion/ddim.py", line 37, in make_schedule\n'
    "    alphas_cumprod = self.model.alphas_cumprod\n"
    "IndexError: index 1000 is out of bounds for dimension 0 with size 1000\n"
    "\rSampling:   0%|          | 0/1 [00:00<?, ?it/s]\n"
)

SIMULATED = (
    "\rDDIM Sampler:  50%|█████     | 4/8 [00:00<00:00, 14.13it/s]\x1b[A\x1b[A"
    "Traceback (most recent call last):\n"
    '  File "sim.py", line 3, in <module>\n'
    '    raise RuntimeError("simulated failure at step 5")\n'
    "RuntimeError: simulated failure at step 5\n"
)

ARGPARSE = (
    "usage: txt2img.py [-h] [--prompt [PROMPT]] [--outdir [OUTDIR]] [--skip_grid]\n"
    "                  [--ddim_steps DDIM_STEPS] [--plms]\n"
    "txt2img.py: error: unrecognized arguments: --foo\n"
)

CHAINED = (
    "Traceback (most recent call last):\n"
    '  File "torch/serialization.py", line 250, in _open_file\n'
    "KeyError: 'ckpt'\n"
    "\n"
    "During handling of the above exception, another exception occurred:\n"
    "\n"
    "Traceback (most recent call last):\n"
    "    raise FileNotFoundError(path)\n"
    "FileNotFoundError: [Errno 2] No such file or directory: 'x.ckpt'\n"
    "Exception ignored in: <function _after_fork at 0x1>\n"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (INDEX_ERROR, "IndexError: index 1000 is out of bounds for dimension 0 with size 1000"),
        (SIMULATED, "RuntimeError: simulated failure at step 5"),
        (ARGPARSE, "txt2img.py: error: unrecognized arguments: --foo"),
        (CHAINED, "FileNotFoundError: [Errno 2] No such file or directory: 'x.ckpt'"),
        (
            'Traceback (most recent call last):\n  File "a.py"\nKeyboardInterrupt\n',
            "KeyboardInterrupt",
        ),
        ("  assert x\nAssertionError\n", "AssertionError"),
        (
            "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\nbye\n",
            "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        ),
        (
            "omegaconf.errors.ConfigKeyError: Missing key model\n",
            "omegaconf.errors.ConfigKeyError: Missing key model",
        ),
        ("ldm.SamplerException: diverged\nDone.\n", "ldm.SamplerException: diverged"),
        (
            "warming up\nCUDA error: device-side assert triggered\nexiting\n",
            "CUDA error: device-side assert triggered",
        ),
        (WARNINGS + "Killed\n", "Killed"),
        (WARNINGS + "Killed\n\n   \n", "Killed"),
    ],
)
def test_last_error(text: str, expected: str) -> None:
    assert last_error(lines_of(text)) == expected


def test_last_error_without_lines() -> None:
    assert last_error([]) is None
    assert last_error(["", "   "]) is None


def test_last_error_never_returns_a_bar_line() -> None:
    bars = [
        "DDIM Sampler:  50%|█████     | 4/8 [00:00<00:00, 14.13it/s]",
        "\x1b[A1it [00:00,  4.43it/s]",
        "Sampling:   0%|          | 0/2 [00:00<?, ?it/s]",
    ]
    assert last_error(bars) is None
    assert last_error(["MemoryError", *bars]) == "MemoryError"
    assert last_error(["loading", *bars]) is None


@pytest.mark.parametrize(
    "text",
    [
        "Running DDIM Sampling with 8 timesteps\n",
        "Loading model from x.ckpt\nGlobal Step: 470000\n",
        WARNINGS,
        "/x/lib/warnings.py:1: UserWarning: the error handler is deprecated\n",
    ],
)
def test_ordinary_output_is_never_taken_for_an_error(text: str) -> None:
    assert last_error(lines_of(text)) is None

"""The fence: every entry a worker host adds to a job's stream goes through one of two Lua
scripts, run atomically by Redis against the job's hash. So a stale attempt (a host that woke
after its job moved on) never adds an entry after a newer `started`, an image is added once,
in order, and a job whose workers keep dying ends FAILED instead of looping.

- START (a delivery begins): the hash gone → "gone", canceled → "canceled" (the message is
  dropped); `deliveries += 1`; a previous `worker` left set on a later delivery died: it is
  appended to `deaths`; the new `attempt` and `worker` are set; past `MAX_DEATHS` deliveries an
  `end failed` entry is added and "dead" returned, else a `started` entry and ("run", made).
  Either entry is announced on the API node's notify stream (keys.NOTIFY: `job <stream>`):
  the API node reads a job's stream only once a worker has started it.
- ADD (any later entry): another attempt is current → 0 (superseded: stop, add nothing more);
  canceled and not an end → -1 (stop the script); an image must be number made+1, else -2
  (out of order: Redis came back from an older snapshot, its `made` behind the host's; the
  host ends the attempt `stopped` and sends the job again, to resume at Redis's `made`; the
  API node skips the images it already kept); an image sets `made`; an `end stopped` (the
  host is stopping) takes its delivery back and clears `worker`: not a death. Then XADD → 1.
- RESENT (a host sent the job's message again): the job's hash, if there, names the new
  Dramatiq message (what a cancel takes back from the queue); a hash gone is not made again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from sd_rest.cluster import entries, keys

if TYPE_CHECKING:
    import redis
    import redis.asyncio

START_SCRIPT: Final = """
local job, stream, notify = KEYS[1], KEYS[2], KEYS[3]
local attempt, worker, max_deaths, notify_max = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
if redis.call('EXISTS', job) == 0 then return {'gone'} end
if redis.call('HGET', job, 'canceled') == '1' then return {'canceled'} end
local deliveries = redis.call('HINCRBY', job, 'deliveries', 1)
local previous = redis.call('HGET', job, 'worker')
if previous and previous ~= '' and deliveries > 1 then
  local who = previous
  local ok, ref = pcall(cjson.decode, previous)
  if ok and type(ref) == 'table' and ref.host ~= nil then
    who = tostring(ref.host) .. ' (pid ' .. tostring(ref.pid) .. ')'
  end
  local deaths = redis.call('HGET', job, 'deaths')
  if deaths and deaths ~= '' then deaths = deaths .. ', ' .. who else deaths = who end
  redis.call('HSET', job, 'deaths', deaths)
end
redis.call('HSET', job, 'attempt', attempt, 'worker', worker)
if deliveries > max_deaths then
  local deaths = redis.call('HGET', job, 'deaths') or ''
  redis.call('XADD', stream, '*', 'kind', 'end', 'attempt', attempt, 'outcome', 'failed',
    'error', 'its worker died ' .. max_deaths .. ' times: ' .. deaths, 'log', '')
  redis.call('XADD', notify, 'MAXLEN', '~', notify_max, '*', 'job', stream)
  return {'dead'}
end
redis.call('XADD', stream, '*', 'kind', 'started', 'attempt', attempt, 'worker', worker,
  'delivery', deliveries)
redis.call('XADD', notify, 'MAXLEN', '~', notify_max, '*', 'job', stream)
return {'run', redis.call('HGET', job, 'made') or '0', tostring(deliveries)}
"""

ADD_SCRIPT: Final = """
local job, stream = KEYS[1], KEYS[2]
local attempt, kind, n = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HGET', job, 'attempt') ~= attempt then return 0 end
if kind ~= 'end' and redis.call('HGET', job, 'canceled') == '1' then return -1 end
if kind == 'image' then
  local made = tonumber(redis.call('HGET', job, 'made') or '0')
  if tonumber(n) ~= made + 1 then return -2 end
  redis.call('HSET', job, 'made', n)
end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
if kind == 'end' then
  for i = 4, #ARGV - 1, 2 do
    if ARGV[i] == 'outcome' and ARGV[i + 1] == 'stopped' then
      redis.call('HINCRBY', job, 'deliveries', -1)
      redis.call('HDEL', job, 'worker')
    end
  end
end
redis.call('XADD', stream, '*', unpack(fields))
return 1
"""

RESENT_SCRIPT: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'message', ARGV[1])
return 1
"""

ADDED: Final = 1
SUPERSEDED: Final = 0
CANCELED: Final = -1
OUT_OF_ORDER: Final = -2

Verdict = Literal["run", "gone", "canceled", "dead"]


@dataclass(frozen=True)
class Start:
    """START's answer: run (resuming after image `made`, this being delivery `delivery`), or
    drop the message (gone, canceled), or the job has failed for its dead workers (dead)."""

    verdict: Verdict
    made: int = 0
    delivery: int = 0


def _start_keys(endpoint: str, job_id: str) -> list[str]:
    return [keys.job(endpoint, job_id), keys.stream(endpoint, job_id)]


def _start_args(attempt: str, worker: entries.WorkerRef) -> list[str | int]:
    return [attempt, json.dumps(worker.to_json()), keys.MAX_DEATHS, keys.NOTIFY_MAXLEN]


def _notified_keys(endpoint: str, job_id: str) -> list[str]:
    return [*_start_keys(endpoint, job_id), keys.NOTIFY]


def _add_args(attempt: str, fields: entries.Fields) -> list[str | bytes | int | float]:
    kind = str(fields["kind"])
    n = fields.get("n", 0) if kind == entries.IMAGE else 0
    flat: list[str | bytes | int | float] = [attempt, kind, n]
    for name, value in fields.items():
        flat += [name, value]
    return flat


def _start_answer(raw: list[bytes | str]) -> Start:
    words = [item.decode() if isinstance(item, bytes) else str(item) for item in raw]
    verdict = words[0]
    if verdict == "run":
        return Start("run", int(words[1]), int(words[2]))
    if verdict in ("gone", "canceled", "dead"):
        return Start(verdict)  # type: ignore[arg-type]
    raise ValueError(f"START answered {words!r}")


class Fence:
    """The two scripts on a blocking client (a Dramatiq worker thread's side)."""

    def __init__(self, client: redis.Redis) -> None:
        self._start = client.register_script(START_SCRIPT)
        self._add = client.register_script(ADD_SCRIPT)
        self._resent = client.register_script(RESENT_SCRIPT)

    def start(
        self, endpoint: str, job_id: str, attempt: str, worker: entries.WorkerRef
    ) -> Start:
        return _start_answer(
            self._start(keys=_notified_keys(endpoint, job_id), args=_start_args(attempt, worker))
        )

    def add(self, endpoint: str, job_id: str, attempt: str, fields: entries.Fields) -> int:
        """ADDED, SUPERSEDED, CANCELED or OUT_OF_ORDER (see the module's docstring)."""
        return int(self._add(keys=_start_keys(endpoint, job_id), args=_add_args(attempt, fields)))

    def resent(self, endpoint: str, job_id: str, message_id: str) -> bool:
        """The job's hash names `message_id` (Dramatiq's id of it in Redis); False: no hash."""
        return bool(self._resent(keys=[keys.job(endpoint, job_id)], args=[message_id]))


class AsyncFence:
    """The two scripts on an asyncio client (the event loop hosting the local runs)."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._start = client.register_script(START_SCRIPT)
        self._add = client.register_script(ADD_SCRIPT)

    async def start(
        self, endpoint: str, job_id: str, attempt: str, worker: entries.WorkerRef
    ) -> Start:
        raw = await self._start(
            keys=_notified_keys(endpoint, job_id), args=_start_args(attempt, worker)
        )
        return _start_answer(raw)

    async def add(self, endpoint: str, job_id: str, attempt: str, fields: entries.Fields) -> int:
        """ADDED, SUPERSEDED, CANCELED or OUT_OF_ORDER (see the module's docstring)."""
        keys_ = _start_keys(endpoint, job_id)
        return int(await self._add(keys=keys_, args=_add_args(attempt, fields)))

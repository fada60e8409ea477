"""Lambda instances: which sandbox answers which request.

A request for lambda <name> takes an idle warm instance of it if there is
one, else creates a sandbox if the per-lambda and total limits allow (an
idle instance of another lambda is destroyed to make room, least recently
used first), else waits in the lambda's queue, else is refused with 429.
Idle instances are paused after `pause_after_ms` and destroyed after
`keep_warm_seconds`; an instance whose code is no longer the registry's
current version is destroyed when it next goes idle, so requests already
running finish on the old code.

Locking: one lock per lambda guards its idle list and counters, one global
lock guards the total count; neither is held while a sandbox is created,
destroyed or asked to run a handler.
"""

import collections
import logging
import threading
import time

from sockworker import errors
from sockworker.guest import codec, protocol

log = logging.getLogger(__name__)

# Memory set aside for zygotes when the import cache is on: room for four
# at their 256 MiB limit (SockBackend's zygote_memory_bytes).
ZYGOTE_RESERVE_MB = 1024


class Instance:
    """A sandbox bound to one version of one lambda."""

    __slots__ = ("sandbox", "code", "last_used", "requests")

    def __init__(self, sandbox, code):
        self.sandbox = sandbox
        self.code = code
        self.last_used = time.monotonic()
        self.requests = 0


class LambdaPool:
    """The instances of one lambda and the requests waiting for one."""

    def __init__(self, name):
        self.name = name
        self.idle = collections.deque()
        self.busy = 0
        self.creating = 0
        self.waiting = 0
        self.cond = threading.Condition()

    def size(self):
        return len(self.idle) + self.busy + self.creating


class LambdaManager:
    """Runs lambdas in sandboxes; see the module docstring for policy.

    Guarantees: every sandbox it creates is destroyed by shutdown(), by
    eviction or after a failure; no sandbox serves two requests at once.
    """

    def __init__(self, config, registry, backend, stats, packages=None):
        self.config = config
        self.registry = registry
        self.backend = backend
        self.recorder = stats
        self.packages = packages
        self.pools = {}
        self.pools_lock = threading.Lock()
        self.total = 0
        self.total_lock = threading.Lock()
        # Code versions that sandboxes use or are being created for; the
        # registry must not delete these.
        self.versions_in_use = collections.Counter()
        self.accepting = True
        self.max_total = max_instances(config)
        self.janitor = threading.Thread(
            target=self.tend, name="sockworker-janitor", daemon=True
        )
        self.stopped = threading.Event()

    def start(self):
        self.janitor.start()

    # -- the request path -------------------------------------------------

    def run(self, name, body):
        """Run lambda name on body; returns (result JSON bytes, cold)."""
        if not self.accepting:
            raise errors.ShuttingDown("worker is shutting down")
        started = time.perf_counter()
        status = 200
        cold = False
        try:
            code = self.pull(name)
            pool = self.pool(name)
            # Counted as in use until an instance holds it, so that no
            # removal of unused code takes it while the request waits.
            self.count_version(code, +1)
            try:
                instance, cold = self.acquire(pool, code)
            finally:
                self.count_version(code, -1)
            try:
                reply = instance.sandbox.request(
                    body, self.config.timeout_seconds
                )
            finally:
                self.release(pool, instance)
            return result_of(name, reply), cold
        except errors.WorkerError as exc:
            status = exc.status
            raise
        except Exception:
            status = 500
            raise
        finally:
            self.recorder.record(
                name, cold, time.perf_counter() - started, status
            )

    def pull(self, name):
        """The lambda's current code. When the code cache is full, the
        versions no instance uses (current ones too) are removed once to
        make room, and the pull is tried again."""
        try:
            return self.registry.get(name)
        except errors.CodeCacheFull as exc:
            log.warning("%s; removing unused code to make room", exc.message)
        with self.total_lock:
            in_use = set(self.versions_in_use)
        self.registry.remove_unused(in_use, keep_current=False)
        return self.registry.get(name)

    def pool(self, name):
        pool = self.pools.get(name)
        if pool is None:
            with self.pools_lock:
                pool = self.pools.setdefault(name, LambdaPool(name))
        return pool

    def acquire(self, pool, code):
        """An instance of code for one request, and whether it is new."""
        deadline = time.monotonic() + self.config.timeout_seconds
        stale = []
        try:
            while True:
                with pool.cond:
                    instance = take_idle(pool, code, stale)
                    if instance is not None:
                        pool.busy += 1
                        return instance, False
                    below_own_limit = (
                        pool.size() < self.config.max_instances_per_lambda
                    )
                    if below_own_limit and self.take_slot():
                        pool.creating += 1
                        break
                    if not below_own_limit:
                        self.wait_in_queue(pool, deadline)
                        continue
                # Lock order: never hold one pool's lock while taking
                # another's, so eviction happens outside ours.
                if self.evict_one(exclude=pool) is None:
                    with pool.cond:
                        self.wait_in_queue(pool, deadline, poll=0.05)
        finally:
            for old in stale:
                self.destroy(old, "code changed in the registry")
        return self.create_instance(pool, code), True

    def take_slot(self):
        with self.total_lock:
            if self.total < self.max_total:
                self.total += 1
                return True
            return False

    def wait_in_queue(self, pool, deadline, poll=None):
        """Wait for an instance of pool to come free (or, with poll, for
        a while, since a slot freed by another lambda notifies nobody
        here)."""
        if self.stopped.is_set():
            raise errors.ShuttingDown("worker is shutting down")
        if pool.waiting >= self.config.queue_per_lambda:
            raise errors.Overloaded(
                f"lambda {pool.name!r}: all {pool.size()} instances are "
                f"busy and {pool.waiting} requests are queued"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise errors.Overloaded(
                f"lambda {pool.name!r}: no instance became free within "
                f"{self.config.timeout_seconds:g} s"
            )
        pool.waiting += 1
        try:
            pool.cond.wait(min(remaining, poll or remaining))
        finally:
            pool.waiting -= 1

    def create_instance(self, pool, code):
        self.count_version(code, +1)
        try:
            sandbox = self.backend.create(
                code.root, packages=self.package_layers(code)
            )
        except BaseException:
            self.count_version(code, -1)
            with pool.cond:
                pool.creating -= 1
                pool.cond.notify()
            self.free_slot()
            raise
        with pool.cond:
            pool.creating -= 1
            pool.busy += 1
        log.info("instance of %s created in sandbox %s", pool.name, sandbox.id)
        return Instance(sandbox, code)

    def package_layers(self, code):
        """Overlay layers of the packages code declares, installed on
        first use."""
        if not code.requirements or self.packages is None:
            return ()
        return tuple(
            package.layer
            for package in self.packages.resolve(code.requirements)
        )

    def release(self, pool, instance):
        instance.requests += 1
        instance.last_used = time.monotonic()
        alive = instance.sandbox.alive()
        keep = alive and not self.stopped.is_set()
        with pool.cond:
            pool.busy -= 1
            if keep:
                pool.idle.append(instance)
            pool.cond.notify()
        if not keep:
            self.destroy(
                instance,
                "sandbox ended" if not alive else "worker shutting down",
            )

    # -- instances going away ----------------------------------------------

    def destroy(self, instance, why):
        try:
            instance.sandbox.destroy()
        except Exception:
            log.exception("destroying sandbox %s failed", instance.sandbox.id)
        log.info(
            "instance of %s in sandbox %s destroyed: %s",
            instance.code.name,
            instance.sandbox.id,
            why,
        )
        self.count_version(instance.code, -1)
        self.free_slot()

    def count_version(self, code, delta):
        key = (code.name, code.version)
        with self.total_lock:
            self.versions_in_use[key] += delta
            if self.versions_in_use[key] <= 0:
                del self.versions_in_use[key]

    def free_slot(self):
        with self.total_lock:
            self.total -= 1

    def evict_one(self, exclude):
        """Destroy the least recently used idle instance of another
        lambda, freeing its slot; returns it, or None if there is none."""
        oldest, oldest_used = None, None
        for pool in list(self.pools.values()):
            if pool is exclude:
                continue
            # Compare times read under each pool's own lock: another
            # thread may empty a pool as soon as its lock is released.
            with pool.cond:
                if not pool.idle:
                    continue
                used = pool.idle[0].last_used
            if oldest is None or used < oldest_used:
                oldest, oldest_used = pool, used
        if oldest is None:
            return None
        with oldest.cond:
            if not oldest.idle:
                return None
            victim = oldest.idle.popleft()
        self.destroy(victim, "evicted to make room")
        return victim

    def tend(self):
        """Janitor thread: pause idle instances, expire old ones."""
        interval = min(
            max(self.config.pause_after_ms / 1000, 0.01),
            max(self.config.keep_warm_seconds / 4, 0.05),
            1.0,
        )
        while not self.stopped.wait(interval):
            try:
                self.tend_once()
            except Exception:
                log.exception("janitor pass failed")

    def tend_once(self):
        now = time.monotonic()
        pause_after = self.config.pause_after_ms / 1000
        expired = []
        for pool in list(self.pools.values()):
            with pool.cond:
                keep = collections.deque()
                for instance in pool.idle:
                    idle_for = now - instance.last_used
                    if idle_for >= self.config.keep_warm_seconds:
                        expired.append(instance)
                        continue
                    if idle_for >= pause_after:
                        pause_quietly(instance)
                    keep.append(instance)
                pool.idle = keep
        for instance in expired:
            self.destroy(instance, "idle past keep-warm time")
        if expired:
            with self.total_lock:
                in_use = set(self.versions_in_use)
            self.registry.remove_unused(in_use)

    # -- lifecycle -----------------------------------------------------------

    def refuse_new(self):
        """Refuse requests from now on (503); those already running, and
        those queued for an instance, still finish. Safe to call from a
        signal handler."""
        self.accepting = False

    def shutdown(self, drain_seconds=30.0):
        """Refuse new requests, let running ones finish, destroy all."""
        self.accepting = False
        self.stopped.set()
        deadline = time.monotonic() + drain_seconds
        for pool in list(self.pools.values()):
            with pool.cond:
                pool.cond.notify_all()
                while pool.busy + pool.creating and (
                    time.monotonic() < deadline
                ):
                    pool.cond.wait(0.05)
                idle, pool.idle = list(pool.idle), collections.deque()
            for instance in idle:
                self.destroy(instance, "worker shutting down")

    def status(self):
        return {
            "state": "serving" if self.accepting else "shutting_down",
            "instances": self.total,
            "max_instances": self.max_total,
            "lambdas": len(self.pools),
        }

    def stats(self):
        snapshot = self.recorder.snapshot()
        snapshot["instances"] = {
            name: {"idle": len(pool.idle), "busy": pool.busy}
            for name, pool in list(self.pools.items())
        }
        return snapshot


def take_idle(pool, code, stale):
    """Pop the most recently used idle instance of code's version; idle
    instances of other versions go to stale for destruction."""
    while pool.idle:
        instance = pool.idle.pop()
        if instance.code.version == code.version:
            return instance
        stale.append(instance)
    return None


def pause_quietly(instance):
    try:
        instance.sandbox.pause()
    except Exception:
        log.exception("pausing sandbox %s failed", instance.sandbox.id)


def result_of(name, reply):
    """The result bytes of a reply, or the WorkerError it describes."""
    status, payload = reply
    if status == protocol.REPLY_OK:
        return payload
    try:
        detail = codec.loads(payload)
    except ValueError:
        detail = {"message": payload.decode(errors="replace")}
    message = f"lambda {name!r}: {detail.get('message', 'failed')}"
    if detail.get("error") == "bad_request":
        raise errors.BadRequest(message)
    extra = {}
    if detail.get("traceback"):
        extra["traceback"] = detail["traceback"]
    raise errors.HandlerError(message, **extra)


def max_instances(config):
    """The total instance limit: the configured count, lowered so that
    every instance's memory limit fits in the memory budget (less what
    zygotes may hold)."""
    budget_mb = config.memory_budget_mb or default_budget_mb()
    if config.import_cache:
        budget_mb -= ZYGOTE_RESERVE_MB
    by_memory = max(1, budget_mb // config.memory_mb)
    return min(config.max_instances, by_memory)


def default_budget_mb():
    """Three quarters of the machine's memory."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 3 // 4 // 1024
    return 4096

"""Which request may start next, so that requests with one prompt share one prefill.

A compare run asks every system about a question with the same prompt (``full`` and each
compressed system). SGLang's radix cache lets the second of two such requests skip the
prefill, but only once the first has been prefilled: two sent together both compute it.
So the first uncompressed request of a prompt (its *leader*; an uncompressed request is
the kind whose prompt the plugin lets into the radix cache) starts at once, and the
others of that prompt wait until the leader reports its prefill done; requests of other
prompts fill the free places meanwhile. A prompt without an uncompressed request starts
all of its requests at once: there is nothing for them to wait for.

``once:`` requests over one corpus share its compressed prefix, which the first of them
stores when it finishes: so the first ``once:`` request of each (corpus, spec) leads, and
the others wait until it is done (``done``), instead of each building its own copy.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from kvrag.compression import CompressionSpec
from kvrag.data.prompt import Prompt

K = TypeVar("K")
Job = tuple[K, Prompt, CompressionSpec | None]


def _prompt_key(prompt: Prompt) -> bytes:
    return hashlib.sha1(prompt.text.encode()).digest()


def _corpus_key(prompt: Prompt, spec: CompressionSpec) -> bytes:
    return hashlib.sha1(f"{prompt.header}\x00{prompt.context}\x00{spec.name}".encode()).digest()


class PrefixAdmission(Generic[K]):
    """Jobs in (question-major) order, handed out by ``next()`` as they may start.

    Consecutive jobs with the same prompt are read as one group, so a ``full`` listed after
    a compressed system still leads. Call ``prefilled(job)`` when a job's prefill is done,
    and ``done(job)`` when it has finished (or failed), so that the jobs waiting on it may go.
    """

    def __init__(self, jobs: Iterable[Job]) -> None:
        self._jobs: Iterator[Job] = iter(jobs)
        self._peeked: Job | None = None
        self._ready: deque[Job] = deque()
        self._waiting: dict[bytes, list[Job]] = {}  # prompt -> jobs behind its leader
        self._leading: dict[int, bytes] = {}  # id(leader job) -> its prompt
        self._prefilled: set[bytes] = set()
        # once: jobs, by (corpus, spec): those behind the first one, and which are stored
        self._once_waiting: dict[bytes, list[Job]] = {}
        self._once_leading: dict[int, bytes] = {}
        self._once_stored: set[bytes] = set()

    def next(self) -> Job | None:
        """A job that may start now, or None when every remaining one waits (or none is
        left: see ``finished``)."""
        while not self._ready and self._read_group():
            pass
        return self._ready.popleft() if self._ready else None

    @property
    def finished(self) -> bool:
        return (not self._ready and not self._waiting and not self._once_waiting
                and self._peek() is None)

    def prefilled(self, job: Job) -> None:
        prompt = self._leading.pop(id(job), None)
        if prompt is not None:
            self._prefilled.add(prompt)
            self._ready.extend(self._waiting.pop(prompt, []))

    def done(self, job: Job) -> None:
        self.prefilled(job)
        corpus = self._once_leading.pop(id(job), None)
        if corpus is not None:
            self._once_stored.add(corpus)
            self._ready.extend(self._once_waiting.pop(corpus, []))

    def _admit_once(self, job: Job) -> None:
        assert job[2] is not None
        corpus = _corpus_key(job[1], job[2])
        if corpus in self._once_stored:
            self._ready.append(job)
        elif corpus in self._once_waiting:  # its leader is still running
            self._once_waiting[corpus].append(job)
        else:
            self._ready.append(job)
            self._once_leading[id(job)] = corpus
            self._once_waiting[corpus] = []

    def _peek(self) -> Job | None:
        if self._peeked is None:
            self._peeked = next(self._jobs, None)
        return self._peeked

    def _read_group(self) -> bool:
        """Sort the next run of same-prompt jobs into ready and waiting; False at the end."""
        first = self._peek()
        if first is None:
            return False
        group, prompt = [], first[1].text
        while (job := self._peek()) is not None and job[1].text == prompt:
            self._peeked = None
            if job[2] is not None and job[2].once:
                self._admit_once(job)
            else:
                group.append(job)
        if not group:
            return True
        key = _prompt_key(first[1])
        if key in self._prefilled:
            self._ready.extend(group)
        elif key in self._waiting:  # its leader is still prefilling
            self._waiting[key].extend(group)
        else:
            leader = next((job for job in group if job[2] is None), None)
            if leader is None:
                self._ready.extend(group)
            else:
                self._ready.append(leader)
                self._leading[id(leader)] = key
                self._waiting[key] = [job for job in group if job is not leader]
        return True

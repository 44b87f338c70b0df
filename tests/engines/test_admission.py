"""Request admission: requests with one prompt wait for its first uncompressed one."""

from kvrag.compression import parse_spec
from kvrag.data.prompt import Prompt
from kvrag.engines.admission import PrefixAdmission

SNAP = parse_spec("snapkv:0.5")


def _prompt(text: str) -> Prompt:
    return Prompt("", text, "", {})


def _drain(admission: PrefixAdmission) -> list:
    out = []
    while (job := admission.next()) is not None:
        out.append(job)
    return out


def test_followers_wait_for_their_leaders_prefill_while_other_prompts_go():
    a, b = _prompt("a"), _prompt("b")
    jobs = [("a-snap", a, SNAP), ("a-full", a, None), ("b-full", b, None), ("b-snap", b, SNAP)]
    admission = PrefixAdmission(jobs)
    first = _drain(admission)
    # a's full leads although listed second; b's leader goes before a's follower
    assert [j[0] for j in first] == ["a-full", "b-full"]
    assert not admission.finished
    admission.prefilled(first[1])
    assert [j[0] for j in _drain(admission)] == ["b-snap"]
    admission.prefilled(first[0])
    assert [j[0] for j in _drain(admission)] == ["a-snap"]
    assert admission.finished


def test_a_prompt_without_an_uncompressed_job_starts_all_at_once():
    a = _prompt("a")
    admission = PrefixAdmission([("s1", a, SNAP), ("s2", a, parse_spec("streamingllm:0.5"))])
    assert [j[0] for j in _drain(admission)] == ["s1", "s2"]
    assert admission.finished


def test_a_later_run_of_a_prefilled_prompt_goes_at_once_and_one_still_prefilling_waits():
    a, r = _prompt("a"), _prompt("rag")
    jobs = [("a-full", a, None), ("rag", r, None), ("a-snap", a, SNAP), ("a-h2o", a, SNAP),
            ("rag-2", r, SNAP), ("a-again", a, SNAP)]
    admission = PrefixAdmission(jobs)
    assert [j[0] for j in _drain(admission)[:2]] == ["a-full", "rag"]
    admission.prefilled(jobs[0])  # a's second run waited on a-full; its third need not
    assert [j[0] for j in _drain(admission)] == ["a-snap", "a-h2o", "a-again"]
    admission.prefilled(jobs[0])  # reporting twice changes nothing
    assert not admission.finished  # rag-2 still waits on rag
    admission.prefilled(jobs[1])
    assert [j[0] for j in _drain(admission)] == ["rag-2"] and admission.finished


def test_jobs_are_read_lazily_one_prompt_at_a_time():
    read = []

    def jobs():
        for i in range(100):
            read.append(i)
            yield (i, _prompt(str(i)), None)

    admission = PrefixAdmission(jobs())
    assert admission.next()[0] == 0
    assert read == [0, 1]  # the next prompt's first job tells where a group ends


def test_once_jobs_over_one_corpus_wait_for_the_first_to_finish():
    """The first once: job of a corpus stores its compressed prefix when it is done; the
    rest of that corpus and spec wait for it, other specs and corpora do not."""
    once, other = parse_spec("once:snapkv:0.5"), parse_spec("once:knorm:0.5")
    q1, q2 = Prompt("h", "corpus", "q1", {}), Prompt("h", "corpus", "q2", {})
    elsewhere = Prompt("h", "another corpus", "q1", {})
    jobs = [("q1-full", q1, None), ("q1-once", q1, once), ("q2-once", q2, once),
            ("q2-knorm", q2, other), ("far-once", elsewhere, once)]
    admission = PrefixAdmission(jobs)
    first = _drain(admission)
    assert {j[0] for j in first} == {"q1-full", "q1-once", "q2-knorm", "far-once"}
    leader = next(j for j in first if j[0] == "q1-once")
    admission.prefilled(leader)  # its first token is not enough: the store lands at the end
    assert _drain(admission) == [] and not admission.finished
    admission.done(leader)
    assert [j[0] for j in _drain(admission)] == ["q2-once"]
    for job in first:
        admission.done(job)
    assert admission.finished

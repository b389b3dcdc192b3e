"""The demo domains: deterministic by seed, held-out tasks kept out of calibration and training text."""

from __future__ import annotations

import itertools
import json

from banpick_cli.demo.corpus import DOMAINS, build_demo_corpus, task_objects, training_documents, write_demo_data
from banpick_cli.paths import DEMO_DATA_DIR
from banpick_cli.evaluation.generate import score_tasks
from banpick_cli.tasks import load_tasks
from banpick_cli.tasks.scoring import score_math, score_mc


def test_same_seed_same_corpus_other_seed_other_corpus():
    a, b, c = build_demo_corpus(0, 40, 60), build_demo_corpus(0, 40, 60), build_demo_corpus(1, 40, 60)
    assert a == b
    for domain in DOMAINS:
        assert a.tasks[domain] != c.tasks[domain] and a.calib[domain] != c.calib[domain]
    docs = lambda corpus: list(itertools.islice(training_documents(corpus, "math", seed=3), 50))  # noqa: E731
    assert docs(a) == docs(b)


def test_held_out_tasks_never_appear_in_calibration_or_training_text():
    corpus = build_demo_corpus(0)
    for domain in DOMAINS:
        tasks = corpus.tasks[domain]
        assert len({t.key for t in tasks}) == len(tasks)
        # the question part of each prompt (without the shared "Question:"/"Answer:" frame)
        questions = [t.prompt.removeprefix("Question: ").split("\n")[0] if t.kind != "code" else t.prompt
                     for t in tasks]
        calib = "\n".join(corpus.calib[domain])
        assert not [q for q in questions if q in calib]
        stream = list(itertools.islice(training_documents(corpus, domain, seed=0, task_fraction=1.0), 3000))
        seen_prompts = {segments[0] for segments in stream}
        assert not seen_prompts & {t.prompt for t in tasks}


def test_reference_answers_score_right():
    corpus = build_demo_corpus(0, n_tasks=30, n_calib=1)
    for domain in DOMAINS:
        specs, tasks = corpus.tasks[domain], task_objects(corpus, domain)
        outcomes = score_tasks(tasks, [s.completion for s in specs])
        assert all(o.correct for o in outcomes), [o for o in outcomes if not o.correct][:2]
    maths = corpus.tasks["math"]
    assert all(score_math(" The answer is 100000.", s.answer)[0] is False for s in maths)
    assert all(score_mc(" " + "ABCD"[("ABCD".index(s.answer) + 1) % 4], s.answer)[0] is False
               for s in corpus.tasks["general"])


def test_shipped_data_is_what_the_generators_write(tmp_path):
    written = write_demo_data(tmp_path, seed=0)
    for domain, files in written.items():
        for kind, path in files.items():
            shipped = DEMO_DATA_DIR / domain / path.name
            assert shipped.read_bytes() == path.read_bytes(), f"{shipped} is stale: rerun tools/train_demo.py"
        calib = [json.loads(line) for line in files["calib"].read_text().splitlines()]
        assert 300 <= len(calib) <= 500 and all(set(r) == {"text"} and r["text"] for r in calib)
        tasks = load_tasks(files["tasks"])
        assert 100 <= len(tasks) <= 200
        assert tasks[0].id == f"{domain}-0001" and {t.domain for t in tasks} == {domain}
        assert {t.kind for t in tasks} == {DOMAINS[domain].kind}
    total = sum(p.stat().st_size for files in written.values() for p in files.values())
    assert total < 2_000_000

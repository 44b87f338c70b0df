"""``kvrag data``: make the demo and needle suites, check a dataset file, build one from
your QA pairs and corpus."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from kvrag.cli.common import JudgeApiKeyOption, console, fail
from kvrag.data.demo import DEMO_CONTEXT_TOKENS, DEMO_PER_TASK, DEMO_SEED, make_demo
from kvrag.data.loaders import LOADERS, load_dataset
from kvrag.data.needles import KINDS as NEEDLE_KINDS
from kvrag.data.needles import TASKS as NEEDLE_TASKS
from kvrag.data.needles import NeedleConfig
from kvrag.data.schema import DatasetError, Instance, write_docs, write_jsonl
from kvrag.engines.models import ModelNotFoundError, kvrag_home, resolve_model
from kvrag.extras import require
from kvrag.rag_stack.errors import (
    ChromaUnavailableError,
    EmbeddingModelNotFoundError,
    RagIndexError,
)

app = typer.Typer(help="Make and check datasets.", no_args_is_help=True)


@app.command("make-demo")
def make_demo_cmd(
    out: Annotated[Path, typer.Option(help="Where to write the JSONL file.")],
    seed: Annotated[int, typer.Option(help="Random seed; the shipped suite uses 0.")] = DEMO_SEED,
    context_tokens: Annotated[
        int, typer.Option(help="Approximate document tokens per question.")
    ] = DEMO_CONTEXT_TOKENS,
    per_task: Annotated[int, typer.Option(help="Questions per task family.")] = DEMO_PER_TASK,
    questions_per_corpus: Annotated[int, typer.Option(help=(
        "Questions asked over each corpus (the shipped demo-shared suite uses 8); above 1, "
        "a corpus of about --context-tokens holds every one of its questions' documents, "
        "and its questions mix the task families."))] = 1,
) -> None:
    """Generate the demo suite (four task families over invented facts) reproducibly."""
    try:
        instances = make_demo(seed=seed, context_tokens=context_tokens, per_task=per_task,
                              questions_per_corpus=questions_per_corpus)
    except ValueError as e:
        fail(str(e))
    write_jsonl(instances, out)
    console.print(f"Wrote {len(instances)} instances to {out}")


@app.command("make-needles")
def make_needles_cmd(
    out: Annotated[Path, typer.Option(help="Where to write the JSONL file.")],
    text_dir: Annotated[Path | None, typer.Option(help=(
        "A folder of .txt/.md files to make the haystacks from (default: the bundled demo's "
        "documents)."))] = None,
    context_tokens: Annotated[int, typer.Option(
        help="Approximate haystack tokens per corpus.")] = NeedleConfig.context_tokens,
    corpora: Annotated[int, typer.Option(
        help="Corpora per task family and value kind.")] = NeedleConfig.corpora,
    needles: Annotated[int, typer.Option(help=(
        "Needles per corpus: multikey asks one question per needle over the shared corpus; "
        "multivalue hides this many values of one key."))] = NeedleConfig.needles,
    tasks: Annotated[str, typer.Option(help=(
        f"Comma-separated task families: {', '.join(NEEDLE_TASKS)}."))] = "multikey",
    kinds: Annotated[str, typer.Option(help=(
        f"Comma-separated needle values: {', '.join(NEEDLE_KINDS)} (7-digit numbers, "
        "words, invented names)."))] = "number",
    doc_tokens: Annotated[int, typer.Option(help=(
        "Document size when --text-dir cuts its files."))] = NeedleConfig.doc_tokens,
    seed: Annotated[int, typer.Option(help="Random seed.")] = NeedleConfig.seed,
) -> None:
    """Write a RULER-style needle suite: special magic numbers, words or names hidden at
    spread depths in haystacks of ordinary text, one question per needle (or per key)."""
    from kvrag.data.needles import folder_passages, make_needles

    try:
        cfg = NeedleConfig(context_tokens=context_tokens, corpora=corpora, needles=needles,
                           tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
                           kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()),
                           doc_tokens=doc_tokens, seed=seed)
        passages = folder_passages(text_dir, doc_tokens) if text_dir is not None else None
        instances = list(make_needles(cfg, passages))
    except (ValueError, DatasetError) as e:  # DatasetError is a ValueError
        fail(str(e))
    write_jsonl(instances, out)
    corpora_made = len({i.corpus_id for i in instances})
    console.print(f"Wrote {len(instances)} questions over {corpora_made} corpora to {out}")


@app.command("make-loft")
def make_loft_cmd(
    out: Annotated[Path, typer.Option(help="The folder to write corpus.jsonl and "
                                           "dev_queries.jsonl to.")],
    passages: Annotated[int, typer.Option(min=1, help="Passages in the corpus.")] = 20000,
    queries: Annotated[int, typer.Option(min=1, help="Questions (at most 500).")] = 40,
    text_dir: Annotated[Path | None, typer.Option(help=(
        "A folder of .txt/.md files to vary into passages (default: the bundled demo's "
        "documents)."))] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a LOFT-layout RAG set at scale: PASSAGES distinct passages (the source text
    varied), one special magic number hidden per question in one passage (its qrel).
    Run it with `kvrag compare --dataset OUT`."""
    from kvrag.data.needles import demo_passages, folder_passages
    from kvrag.data.scale import make_loft
    from kvrag.data.schema import Doc

    try:
        pairs = folder_passages(text_dir, 200) if text_dir is not None else demo_passages()
        source = [Doc(f"s{i}", title, text) for i, (title, text) in enumerate(pairs)]
        make_loft(out, source, passages, queries, seed)
    except (ValueError, DatasetError) as e:
        fail(str(e))
    console.print(f"Wrote {passages:,} passages and {queries} questions to {out} "
                  "(corpus.jsonl, dev_queries.jsonl)")


@app.command("check")
def check_cmd(
    dataset: Annotated[str, typer.Argument(help="A .jsonl path, 'demo' or 'demo-shared'.")],
    fmt: Annotated[
        str, typer.Option("--format", help=f"One of auto, {', '.join(sorted(LOADERS))}.")
    ] = "auto",
) -> None:
    """Validate a dataset file and print what it holds."""
    try:
        instances = load_dataset(dataset, fmt)
    except DatasetError as e:
        fail(str(e))
    groups = Counter(i.group for i in instances)
    corpora = len({i.corpus_id for i in instances})
    console.print(f"{dataset}: {len(instances)} valid instances over {corpora} corpora; "
                  + ", ".join(f"{g}: {n}" for g, n in sorted(groups.items())))


@app.command("build")
def build_cmd(
    questions: Annotated[Path, typer.Option(help=(
        "JSONL of QA pairs: id, question, answers (list), and gold_ids (passage or document "
        "ids; gold_doc_ids, as in a kvrag dataset, is read the same) and/or gold_texts "
        "(passages containing one are gold)."))],
    corpus: Annotated[Path, typer.Option(help=(
        "The corpus: a JSONL of {id, title, text} documents, or a folder of .txt/.md "
        "files."))],
    out: Annotated[Path, typer.Option(help=(
        "Where to write the kvrag JSONL; its passages go to OUT.corpus.jsonl beside it, "
        "which rag systems then retrieve from."))],
    negatives: Annotated[int, typer.Option(
        min=0, help="Hard negatives per question: the retriever's top passages.")] = 20,
    passage_words: Annotated[int, typer.Option(
        min=10, help="Passage size in words (the corpus is split with LlamaIndex).")] = 100,
    max_tokens: Annotated[int, typer.Option(min=64, help=(
        "Cap each prompt (chat template included) at this many tokens of --model by "
        "dropping the lowest-ranked negatives."))] = 32000,
    seed: Annotated[int, typer.Option(help="Seed of the gold/negative shuffle.")] = 0,
    model: Annotated[str, typer.Option(
        help="The model whose tokenizer measures --max-tokens (smollm2 or a checkpoint).")
    ] = "smollm2",
    judge_url: Annotated[str | None, typer.Option(help=(
        "Check each promotion (a negative containing a gold answer) with an LLM judge at "
        "this OpenAI-compatible URL; a negative it rejects stays a negative."))] = None,
    judge_model: Annotated[str | None, typer.Option(
        help="The judge's model name (default: the first the server lists).")] = None,
    judge_api_key: JudgeApiKeyOption = None,
    embed_model: Annotated[Path | None, typer.Option(help=(
        "A sentence-transformers model directory for the retriever (default: the packaged "
        "all-MiniLM-L6-v2)."))] = None,
    index_dir: Annotated[Path | None, typer.Option(
        help="Embedded Chroma folder (default: $KVRAG_HOME/index).")] = None,
    chroma_url: Annotated[str | None, typer.Option(
        help="A Chroma server URL instead of the embedded store.")] = None,
) -> None:
    """Build corpus-in-context instances with hard negatives from your QA pairs and corpus.

    Per question: the top --negatives passages of a dense retriever (the corpus is
    ingested once into Chroma), negatives that contain a gold answer promoted to gold,
    gold and negatives shuffled, the lowest-ranked negatives dropped to fit --max-tokens.
    Each instance records its provenance (retriever, K, promoted ids). An interrupted
    build resumes from OUT.partial.
    """
    from transformers import AutoTokenizer

    from kvrag.cli.common import IngestProgress, StepProgress
    from kvrag.data.loaders import CORPUS_SUFFIX
    from kvrag.data.schema import docs_digest
    from kvrag.data.sources import read_docs
    from kvrag.evaluation.dataset_builder import (
        BuildConfig,
        Builder,
        PartialOutput,
        build_all,
        passages,
        read_questions,
    )
    from kvrag.evaluation.judge import ChatClient, JudgeUnavailableError
    from kvrag.rag_stack.config import RagConfig
    from kvrag.rag_stack.embeddings import embedding_model_id

    require("rag", "kvrag data build")
    from kvrag.rag_stack.pipeline import RagPipeline

    if out.suffix != ".jsonl":
        fail(f"--out must be a .jsonl path, got {out}")
    try:
        qs = read_questions(questions)
        docs, source = passages(read_docs(corpus), passage_words)
        if not docs:
            raise DatasetError(f"{corpus}: the corpus holds no text")
        judge = (ChatClient(judge_url, judge_model, api_key=judge_api_key) if judge_url
                 else None)
        config = BuildConfig(negatives, passage_words, max_tokens, seed,
                             embedding_model_id(embed_model), judge and judge.model,
                             docs_digest(docs), model)
        model_path = resolve_model(model, console)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        pipeline = RagPipeline.from_config(RagConfig(
            index_dir=index_dir or kvrag_home() / "index", chroma_url=chroma_url,
            chunk_tokens=8 * passage_words + 64, embed_model=embed_model))
        output = PartialOutput(out, config)
    except (DatasetError, ValueError, ModelNotFoundError, ChromaUnavailableError,
            EmbeddingModelNotFoundError, JudgeUnavailableError, RagIndexError) as e:
        fail(str(e))
    key = config.corpus_digest

    def tokenize(text: str) -> list:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    try:
        with IngestProgress(len(docs), "embedding passages") as progress:
            pipeline.ingest(key, docs, tokenize, on_batch=progress.on_batch)
    except RagIndexError as e:
        fail(str(e))
    builder = Builder(docs, source, pipeline, key, config, tokenizer, judge)
    todo = [q for q in qs if q.id not in output.done]
    console.print(f"{len(qs) - len(todo)}/{len(qs)} questions already in {output.partial}; "
                  f"building {len(todo)}.")
    with StepProgress("building", len(todo), "promoted") as progress:
        built: list[Instance] = []

        def on_built(instance: Instance) -> None:
            built.append(instance)
            progress.update(len(built), str(sum(len(i.provenance["promoted"]) for i in built)))

        try:
            output.write(build_all(todo, builder, questions, on_built))
        except (DatasetError, JudgeUnavailableError) as e:
            fail(f"{e}; the {len(qs) - len(todo) + len(built)} instances built so far are "
                 f"kept in {output.partial} and a rerun resumes after them")
    corpus_out = out.with_name(out.name.removesuffix(".jsonl") + CORPUS_SUFFIX)
    write_docs(docs, corpus_out)
    output.finish()
    instances = load_dataset(str(out), "kvrag")
    promoted = sum(len(i.provenance["promoted"]) for i in instances)
    rejected = sum(len(i.provenance["promotion_rejected"]) for i in instances)
    judged = f" ({rejected} more rejected by {judge.model})" if judge is not None else ""
    console.print(f"Wrote {len(instances)} instances over {len(docs)} passages to {out}; "
                  f"{promoted} negatives promoted to gold{judged}; the corpus is in "
                  f"{corpus_out}")

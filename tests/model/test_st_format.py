"""dr model folders <-> sentence-transformers folders, checked against the real package (tiny local models).

Out: a folder `BiEncoder.save` writes opens with `SentenceTransformer(path)` and gives `dr encode`'s
vectors (queries through `encode_query`, passages through `encode_document`, prefixes as prompts).
In: `dr encode` on a folder the package saved reads its pooling, normalisation and prompts; a flag that
contradicts them is refused unless `--ignore_st_config`; a plain HF folder gets one warning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from dr.io.shards import read_shard
from tests.helpers import FILLER, TOPICS, command, write_jsonl

pytest.importorskip("sentence_transformers")

MAX_LEN = 16  # both sides: sentence-transformers has one max length (texts below exceed it)


def _texts(n: int, words: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = TOPICS + FILLER
    return [" ".join(rng.choice(vocab, size=int(rng.integers(2, words)))) for _ in range(n)]


QUERIES = _texts(6, 24, 1)
PASSAGES = _texts(8, 40, 2)


def save_dr_model(source: Path, out: Path, perturb_passage: bool = False, **settings) -> Path:
    """A dr model folder written by `BiEncoder.save` (what `dr train` saves), without training."""
    import torch

    from dr.model.encoder import BiEncoder
    from dr.model.text import load_tokenizer, resolve_append_eos

    model = BiEncoder.from_pretrained(
        str(source), overrides={"q_max_len": MAX_LEN, "p_max_len": MAX_LEN, **settings}
    )
    tokenizer = load_tokenizer(str(source))
    model.encoder_config.append_eos = resolve_append_eos(model.encoder_config, tokenizer)
    if perturb_passage:  # untied encoders that really differ
        with torch.no_grad():
            for p in model.passage_encoder.parameters():
                p.add_(0.05 * torch.randn_like(p))
    model.save(out, tokenizer=tokenizer)
    return out


def dr_encode(model: Path, tmp: Path, side: str, *flags: str) -> np.ndarray:
    """`dr encode` in-process; the vectors in input order."""
    texts = QUERIES if side == "query" else PASSAGES
    rows = [{"query_id" if side == "query" else "docid": str(i), "query" if side == "query" else "text": t}
            for i, t in enumerate(texts)]  # fmt: skip
    data = write_jsonl(tmp / f"{side}.jsonl", rows)
    out = tmp / f"emb-{side}"
    argv = [
        "--model_name_or_path", str(model), "--dataset_name", str(data), "--encoded_save_path", str(out),
        "--per_device_eval_batch_size", "4", "--dataloader_num_workers", "0", "--q_max_len", str(MAX_LEN),
        "--p_max_len", str(MAX_LEN), "--dataset_cache_dir", str(tmp / ".cache"), "--overwrite",
        *(["--encode_is_qry"] if side == "query" else []), *flags,
    ]  # fmt: skip
    assert command("encode")(argv) == 0
    ids, vectors, _ = read_shard(next(tmp.glob(f"emb-{side}*.arrow")))
    assert ids == [str(i) for i in range(len(texts))]
    return vectors


def st_vectors(model: Path) -> tuple[np.ndarray, np.ndarray]:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model), device="cpu")
    return st.encode_query(QUERIES, convert_to_numpy=True), st.encode_document(
        PASSAGES, convert_to_numpy=True
    )


CASES = {
    "cls-prefixes": {
        "pooling": "cls",
        "normalize": False,
        "query_prefix": "query: ",
        "passage_prefix": "passage: ",
    },
    "mean-normalized-prefixes": {
        "pooling": "mean",
        "normalize": True,
        "query_prefix": "q: ",
        "passage_prefix": "p: ",
    },
    "mean-plain": {"pooling": "mean", "normalize": False},
    "last-normalized": {"pooling": "last", "normalize": True, "query_prefix": "find: "},
}


@pytest.mark.parametrize("case", CASES)
def test_sentence_transformers_opens_a_dr_folder_with_dr_encode_vectors(tiny_model_dir, tmp_path, case):
    settings = CASES[case]
    model = save_dr_model(tiny_model_dir, tmp_path / "model", **settings)
    config = json.loads((model / "config_sentence_transformers.json").read_text())
    assert config["prompts"] == {
        "query": settings.get("query_prefix", ""), "document": settings.get("passage_prefix", "")
    }  # fmt: skip
    assert config["similarity_fn_name"] == ("cosine" if settings["normalize"] else "dot")
    assert (model / "2_Normalize").is_dir() == settings["normalize"]
    st_q, st_p = st_vectors(model)
    dr_q, dr_p = dr_encode(model, tmp_path, "query"), dr_encode(model, tmp_path, "passage")
    assert np.abs(st_q - dr_q).max() <= 1e-5
    assert np.abs(st_p - dr_p).max() <= 1e-5
    if settings["normalize"]:
        assert np.allclose(np.linalg.norm(st_p, axis=1), 1, atol=1e-5)


def test_untied_encoders_become_a_router(tiny_model_dir, tmp_path):
    model = save_dr_model(
        tiny_model_dir, tmp_path / "model", perturb_passage=True, untie_encoder=True, pooling="mean",
        normalize=True, query_prefix="q: ", passage_prefix="p: ",
    )  # fmt: skip
    assert (model / "router_config.json").is_file() and (model / "query_model" / "tokenizer.json").is_file()
    st_q, st_p = st_vectors(model)
    dr_q, dr_p = dr_encode(model, tmp_path, "query"), dr_encode(model, tmp_path, "passage")
    assert np.abs(st_q - dr_q).max() <= 1e-5
    assert np.abs(st_p - dr_p).max() <= 1e-5


def test_append_eos_models_get_no_st_files_and_stale_ones_go(tiny_model_dir, tmp_path, caplog):
    model = save_dr_model(tiny_model_dir, tmp_path / "model", pooling="mean")
    assert (model / "modules.json").is_file()
    with caplog.at_level(logging.WARNING, logger="dr.model"):
        save_dr_model(tiny_model_dir, model, pooling="mean", append_eos=True)
    assert not (model / "modules.json").exists() and not (model / "1_Pooling").exists()
    assert "appends EOS" in caplog.text


def test_write_st_files_for_an_existing_dr_folder(tiny_model_dir, tmp_path):
    from dr.model.st_format import remove_st_files, write_st_files

    model = save_dr_model(
        tiny_model_dir, tmp_path / "model", pooling="cls", normalize=True, query_prefix="q: "
    )
    before = (model / "1_Pooling" / "config.json").read_text()
    remove_st_files(model)
    assert not (model / "modules.json").exists()
    assert write_st_files(model) is None
    assert (model / "1_Pooling" / "config.json").read_text() == before


# ---- in: a sentence-transformers folder ----------------------------------------------------------------


def save_st_model(
    source: Path, out: Path, pooling: str = "mean", normalize: bool = True, dense: bool = False
) -> Path:
    """A folder saved by sentence-transformers itself (the package's current format)."""
    from sentence_transformers import SentenceTransformer, models

    transformer = models.Transformer(str(source), max_seq_length=MAX_LEN)
    modules = [transformer, models.Pooling(32, pooling_mode=pooling)]
    if dense:
        modules.append(models.Dense(32, 8))
    if normalize:
        modules.append(models.Normalize())
    st = SentenceTransformer(
        modules=modules, prompts={"query": "query: ", "document": "passage: "}, device="cpu"
    )
    st.save(str(out))
    return out


def test_dr_encode_reads_a_sentence_transformers_folder(tiny_model_dir, tmp_path):
    model = save_st_model(tiny_model_dir, tmp_path / "st")
    st_q, st_p = st_vectors(model)
    assert np.abs(st_q - dr_encode(model, tmp_path, "query")).max() <= 1e-5
    assert np.abs(st_p - dr_encode(model, tmp_path, "passage")).max() <= 1e-5
    # dr train / dr score resolve through the same function
    from dr.model.encoder import _model_settings

    config = _model_settings(str(model), {}, False, None)
    assert (config.pooling, config.normalize, config.query_prefix, config.passage_prefix) == (
        "mean", True, "query: ", "passage: "
    )  # fmt: skip


def test_contradicting_flag_is_an_error_unless_ignored(tiny_model_dir, tmp_path, capsys):
    model = save_st_model(tiny_model_dir, tmp_path / "st")
    data = write_jsonl(tmp_path / "p.jsonl", [{"docid": "0", "text": "apple river"}])
    argv = [
        "--model_name_or_path", str(model), "--dataset_name", str(data), "--encoded_save_path",
        str(tmp_path / "out"), "--dataloader_num_workers", "0", "--pooling", "cls",
    ]  # fmt: skip
    assert command("encode")(argv) == 2
    err = capsys.readouterr().err
    assert "--pooling 'cls' contradicts" in err and "pooling 'mean'" in err and "--ignore_st_config" in err
    assert command("encode")([*argv, "--ignore_st_config"]) == 0


def test_unsupported_modules_are_named(tiny_model_dir, tmp_path):
    from dr.errors import InputError
    from dr.model.st_format import read_st_settings

    with pytest.raises(InputError, match="Dense"):
        read_st_settings(save_st_model(tiny_model_dir, tmp_path / "dense", dense=True))
    with pytest.raises(InputError, match="'max' has no dr equivalent"):
        read_st_settings(save_st_model(tiny_model_dir, tmp_path / "max", pooling="max"))


def test_plain_hf_folder_warns_once(tiny_model_dir, caplog):
    from dr.model import encoder

    encoder._warned_defaults.discard(str(tiny_model_dir))
    with caplog.at_level(logging.WARNING, logger="dr.model"):
        for _ in range(2):
            config = encoder._model_settings(str(tiny_model_dir), {"pooling": None}, False, None)
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "no pooling information" in r.message
    ]
    assert len(warnings) == 1 and "cls pooling, normalize False" in warnings[0].message
    assert config.pooling == "cls"
    caplog.clear()
    encoder._warned_defaults.discard(str(tiny_model_dir))
    with caplog.at_level(logging.WARNING, logger="dr.model"):
        encoder._model_settings(str(tiny_model_dir), {"pooling": "mean", "normalize": True}, False, None)
    assert "no pooling information" not in caplog.text

"""`dr encode` / `python -m dr.encode`: flags, the process group, and publishing the manifest.

Every rank checks the input and the existing outputs and encodes its own part (`dr.encode.run`); all
ranks then agree on success (a collective, so a failing rank cannot leave the others waiting), and only
then does rank 0 write the manifest that makes the shard complete.
"""

from __future__ import annotations

import argparse
import logging

from dr import distributed as dist
from dr.encode.run import EncodeArguments, run_encode, write_manifest
from dr.flags import DataArguments, ModelArguments, dataclass_parser, to_dataclasses

logger = logging.getLogger("dr.encode")

ARGUMENT_TYPES = (ModelArguments, DataArguments, EncodeArguments)


def build_parser() -> argparse.ArgumentParser:
    """Model + data + encode flags (Tevatron v1 spellings; newer ones as aliases)."""
    return dataclass_parser(ARGUMENT_TYPES, prog="dr encode", description="Encode texts into Arrow shards.")


def run(args: argparse.Namespace) -> int:
    model_args, data_args, encode_args = to_dataclasses(args, ARGUMENT_TYPES)
    with dist.process_group():
        error: Exception | None = None
        try:
            result = run_encode(model_args, data_args, encode_args)
        except Exception as err:  # noqa: BLE001 - every rank must reach the agreement, then it is raised
            error = err
        dist.raise_if_any_failed(error)
        if dist.get_rank() == 0:
            write_manifest(result.plan, result.expected, result.config, result.corpus)
            layout = result.plan.layout
            logger.info("manifest %s; shard files: %s", layout.manifest, layout.glob)
    return 0

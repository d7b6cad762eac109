"""Out-of-fold teacher scores for distillation (bench, not the package): split a training file by query, merge back.

A teacher trained on the very queries it then scores is close to an oracle there (SciFact: a cross-encoder
ranks the judged positive above all 15 mined negatives for 92 % of its own training queries), so its soft
labels are the hard labels again and distillation gains nothing. Out-of-fold scoring fixes that: split the
queries into K folds, train one teacher on all folds but k, let it score fold k only, and merge the K scored
folds back into one file. Every score then comes from a teacher that never saw that query.

    python -m bench.folds split --input M.jsonl --folds 2 --seed 42 --output_dir D
        # D/fold-K.jsonl (the queries to score) and D/train-K.jsonl (all other folds: the teacher's data)
    python -m bench.folds merge --input M.jsonl --scored D/fold-0.scored.jsonl D/fold-1.scored.jsonl \
        --output S.jsonl   # one scored line per line of M, in M's order; fails if a query is missing or repeated
    python -m bench.folds accuracy --scored S.jsonl --temperatures 0.5 1 2   # how sharp the teacher is

Folds are a seeded shuffle of the query ids cut into K near-equal parts, so a rerun makes the same split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from collections.abc import Sequence

from dr.io.atomic import atomic_path


def read_groups(path: str) -> list[tuple[str, str]]:
    """(query_id, raw line) for every non-empty line of a JSONL training file, naming the line on bad input."""
    groups = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                query_id = str(json.loads(line)["query_id"])
            except (json.JSONDecodeError, KeyError) as error:
                raise SystemExit(
                    f"{path}:{number}: not a training group with a query_id ({error})"
                ) from error
            groups.append((query_id, line if line.endswith("\n") else line + "\n"))
    return groups


def fold_of_queries(query_ids: Sequence[str], folds: int, seed: int) -> dict[str, int]:
    """Each query id's fold: a seeded shuffle cut into `folds` contiguous, near-equal parts."""
    unique = sorted(set(query_ids))
    random.Random(seed).shuffle(unique)
    size = math.ceil(len(unique) / folds)
    return {query_id: index // size for index, query_id in enumerate(unique)}


def write_lines(path: str, lines: Sequence[str]) -> None:
    """Write lines atomically (temp name, then rename), so a killed run leaves no partial fold."""
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        handle.writelines(lines)


def split(input_path: str, folds: int, seed: int, output_dir: str) -> None:
    groups = read_groups(input_path)
    assignment = fold_of_queries([query_id for query_id, _ in groups], folds, seed)
    os.makedirs(output_dir, exist_ok=True)
    for fold in range(folds):
        held_out = [line for query_id, line in groups if assignment[query_id] == fold]
        rest = [line for query_id, line in groups if assignment[query_id] != fold]
        write_lines(os.path.join(output_dir, f"fold-{fold}.jsonl"), held_out)
        write_lines(os.path.join(output_dir, f"train-{fold}.jsonl"), rest)
        print(f"fold {fold}: {len(held_out)} groups to score, teacher trains on {len(rest)}")


def merge(input_path: str, scored_paths: Sequence[str], output: str) -> None:
    """Put the scored folds back in the input's order; every input group must be scored exactly once."""
    by_query: dict[str, str] = {}
    for path in scored_paths:
        for query_id, line in read_groups(path):
            if query_id in by_query:
                raise SystemExit(f"{path}: query {query_id} is scored in more than one fold")
            by_query[query_id] = line
    order = [query_id for query_id, _ in read_groups(input_path)]
    missing = [query_id for query_id in order if query_id not in by_query]
    if missing:
        raise SystemExit(
            f"{output}: {len(missing)} queries of {input_path} have no scores, e.g. {missing[:3]}"
        )
    write_lines(output, [by_query[query_id] for query_id in order])
    print(f"merged {len(order)} scored groups into {output}")


def accuracy(scored_path: str, temperatures: Sequence[float] = (), group: int = 4, seed: int = 0) -> None:
    """How sharp the teacher is on these groups: the share of queries whose judged positive it scores above
    every negative, and, per temperature T, the mean softmax(score / T) mass on the positive over groups
    of `group` passages as the student sees them (the positive + `group - 1` negatives drawn at random)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    first = total = 0
    groups = []
    for _, line in read_groups(scored_path):
        row = json.loads(line)
        positive = max(p["score"] for p in row["positive_passages"])
        negatives = np.array([p["score"] for p in row["negative_passages"]], dtype=np.float64)
        first += bool((positive > negatives).all())
        total += 1
        drawn = rng.choice(len(negatives), size=min(group - 1, len(negatives)), replace=False)
        groups.append(np.concatenate([[positive], negatives[drawn]]))
    print(
        f"{scored_path}: positive above all negatives for {first}/{total} queries ({100 * first / total:.1f} %)"
    )
    for temperature in temperatures:
        weights = [np.exp((g - g.max()) / temperature) for g in groups]  # softmax numerators, stable
        mass = [w[0] / w.sum() for w in weights]
        print(f"  T = {temperature:g}: mean mass on the positive in groups of {group}: {np.mean(mass):.3f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    split_parser = commands.add_parser("split")
    split_parser.add_argument("--input", required=True)
    split_parser.add_argument("--folds", type=int, default=2)
    split_parser.add_argument("--seed", type=int, default=42)
    split_parser.add_argument("--output_dir", required=True)
    merge_parser = commands.add_parser("merge")
    merge_parser.add_argument("--input", required=True)
    merge_parser.add_argument("--scored", nargs="+", required=True)
    merge_parser.add_argument("--output", required=True)
    accuracy_parser = commands.add_parser("accuracy")
    accuracy_parser.add_argument("--scored", required=True)
    accuracy_parser.add_argument("--temperatures", type=float, nargs="*", default=[])
    accuracy_parser.add_argument("--group", type=int, default=4)
    args = parser.parse_args(argv)
    if args.command == "split":
        if args.folds < 2:
            parser.error("--folds must be at least 2")
        split(args.input, args.folds, args.seed, args.output_dir)
    elif args.command == "merge":
        merge(args.input, args.scored, args.output)
    else:
        accuracy(args.scored, args.temperatures, args.group)


if __name__ == "__main__":
    main()

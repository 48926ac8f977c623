"""Benchmark: the on-disk suffix-array index (R_subgram) against today's in-memory tables.

Training tokens: stories260K's tokenizer on the shared TinyStories text. 0.5M = train-1097.txt as
it is (real text); larger sizes repeat every shared story (train-1097, train-5511-lowercase,
valid-head: about 2.9M tokens) in a fresh shuffled story order per pass (seed 0) until the size
is reached, so their n-gram statistics are those of a small corpus seen many times. Each stage
runs in its own subprocess; peak memory is that process's peak RSS (``ru_maxrss``), with the
RSS before the stage (Python, numpy, the token arrays) shown beside it.

- build: write tokens + tokengrams suffix sort: seconds, bytes on disk per token, peak RSS;
- match: 20,000 predictions of valid-head.txt (stories260K's distributions, computed once and
  saved) against R_subgram: burn-in on the first 1,000, then the timed 20,000; the in-memory
  tables at 0.5M for comparison (their build time reported apart);
- R_all: peak RSS of building its in-memory tables and matching 2,000 predictions at 0.5M and
  1M tokens, per training token (the basis of R_ALL_MAX_TOKENS).

    python bench/bench_rules_index.py [--sizes 0.5,5,50] [--out /tmp/tinyscope-bench-rules]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from common import run_part

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("TINYSCOPE_SHARED", ROOT.parent / "shared"))
MODEL = SHARED / "models" / "stories260K"
TS = SHARED / "corpora" / "tinystories"
TRAIN = TS / "train-1097.txt"
EXTRA = [TS / "train-5511-lowercase.txt", TS / "valid-head.txt"]
VALID = TS / "valid-head.txt"
N_MATCH = 20_000
BURN_IN = 1_000


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def part_tokens(out: Path) -> dict:
    """Token arrays of every shared story (train-1097 first), saved once."""
    from transformers import AutoTokenizer

    from precompute.corpus import read_text_corpus

    tok = AutoTokenizer.from_pretrained(str(MODEL))
    res = {}
    for name, paths in (("train", [TRAIN]), ("all", [TRAIN, *EXTRA])):
        lens, flat = [], []
        for p in paths:
            stories = list(read_text_corpus(p).stories)
            for i in range(0, len(stories), 512):
                for ids in tok(stories[i : i + 512], add_special_tokens=False, verbose=False)["input_ids"]:
                    lens.append(len(ids))
                    flat.append(np.asarray(ids, dtype=np.uint16))
        np.save(out / f"{name}_flat.npy", np.concatenate(flat))
        np.save(out / f"{name}_lens.npy", np.asarray(lens, dtype=np.int64))
        res[name] = int(sum(lens))
    return res


def _stories(out: Path, n_tokens: int):
    """Batches of token arrays, one per story: train-1097 as it is when it covers n_tokens' size
    class (0.5M), else all shared stories in a new shuffled order per pass up to n_tokens."""
    real = n_tokens <= 600_000
    flat = np.load(out / ("train_flat.npy" if real else "all_flat.npy"), mmap_mode="r")
    lens = np.load(out / ("train_lens.npy" if real else "all_lens.npy"))
    starts = np.concatenate(([0], np.cumsum(lens)))
    rng = np.random.default_rng(0)
    done = 0
    while True:
        order = np.arange(len(lens)) if real else rng.permutation(len(lens))
        batch = []
        for i in order:
            batch.append(flat[starts[i] : starts[i + 1]])
            done += int(lens[i])
            if len(batch) == 512:
                yield batch
                batch = []
            if done >= n_tokens:
                break
        if batch:
            yield batch
        if real or done >= n_tokens:
            return


def part_build(out: Path, n_tokens: int) -> dict:
    from precompute.ngrams.suffix import build_suffix_index

    folder = out / f"sa-{n_tokens}"
    shutil.rmtree(folder, ignore_errors=True)
    rss0 = _current_rss_mb()
    t0 = time.perf_counter()
    sa = build_suffix_index(folder, _stories(out, n_tokens), 512, f"bench-{n_tokens}", "story", progress=False)
    wall = time.perf_counter() - t0
    return dict(n_tokens=len(sa), wall_s=wall, disk_bytes=sa.nbytes(), bytes_per_token=sa.nbytes() / len(sa),
                peak_rss_mb=_rss_mb(), rss_before_mb=rss0, n_stories=sa.info.n_stories)


def part_inputs(out: Path) -> dict:
    """stories260K's distributions, contexts and targets of the first predictions of valid-head.txt."""
    import torch

    from precompute.corpus import read_text_corpus
    from precompute.jobs.rules import model_probs
    from precompute.models import load_model
    from precompute.ngrams.matcher import contexts_of
    from precompute.sequences import batches, tokenize

    torch.set_num_threads(2)
    n = N_MATCH + BURN_IN
    lm = load_model(str(MODEL))
    seqs = tokenize(lm, read_text_corpus(VALID), ctx_len=256, max_tokens=int(n * 1.05) + 2000)
    got: dict[int, tuple] = {}
    for b in batches(seqs, 32):
        probs = model_probs(lm, b.ids).numpy()
        for r, (k, ln) in enumerate(zip(b.seq_idx, b.lengths)):
            ids = seqs.ids[k].astype(np.int64)
            c, l = contexts_of(ids, lm.bos_id, first=1)
            t = np.arange(1, ln)
            got[k] = (probs[r, t - 1], c[t], l[t], ids[t])
    cat = [np.concatenate([got[k][i] for k in sorted(got)])[:n] for i in range(4)]
    np.savez(out / "inputs.npz", P=cat[0].astype(np.float32), C=cat[1], L=cat[2], T=cat[3])
    return dict(n=len(cat[0]))


def _inputs(out: Path):
    z = np.load(out / "inputs.npz")
    return z["P"], z["C"], z["L"], z["T"]


def part_match(out: Path, n_tokens: int, kind: str, rule_set_name: str = "subgram", n_match: int = N_MATCH) -> dict:
    from precompute.ngrams.matcher import Matcher
    from precompute.ngrams.suffix import SuffixIndex
    from precompute.ngrams.templates import rule_set
    from precompute.ngrams.training import memory_index

    P, C, L, T = _inputs(out)
    rss0 = _current_rss_mb()
    t0 = time.perf_counter()
    sa = SuffixIndex(out / f"sa-{n_tokens}")
    index = sa if kind == "sa" else memory_index(sa, max_tokens=10**12)
    m = Matcher(index, rule_set(rule_set_name))
    b = slice(0, BURN_IN)
    m.match(P[b], C[b], L[b], T[b])  # burn-in; builds the in-memory tables
    t1 = time.perf_counter()
    s = slice(BURN_IN, BURN_IN + n_match)
    res = m.match(P[s], C[s], L[s], T[s])
    t2 = time.perf_counter()
    d = res.defined
    return dict(kind=kind, rule_set=rule_set_name, n_tokens=len(sa), n=int(s.stop - s.start), setup_s=t1 - t0, match_s=t2 - t1,
                agreement=float(res.agree[d].mean()), n_defined=int(d.sum()), peak_rss_mb=_rss_mb(), rss_before_mb=rss0,
                tables_mb=(index.nbytes() / 2**20) if kind == "mem" else None)


def part_compare(out: Path, n_tokens: int, rounds: int = 3) -> dict:
    """R_subgram matching, suffix array vs in-memory tables, in one process: burn-in for both (the
    tables get built), then ``rounds`` alternating timed rounds; medians (wall and CPU)."""
    from precompute.ngrams.matcher import Matcher
    from precompute.ngrams.suffix import SuffixIndex
    from precompute.ngrams.templates import rule_set

    from precompute.ngrams.training import memory_index

    P, C, L, T = _inputs(out)
    sa = SuffixIndex(out / f"sa-{n_tokens}")
    b = slice(0, BURN_IN)
    t0 = time.perf_counter()
    ms = {"sa": Matcher(sa, rule_set("subgram"))}
    ms["sa"].match(P[b], C[b], L[b], T[b])
    t1 = time.perf_counter()
    mem = memory_index(sa)
    ms["mem"] = Matcher(mem, rule_set("subgram"))  # builds the 7 tables
    ms["mem"].match(P[b], C[b], L[b], T[b])
    mem_build = time.perf_counter() - t1
    s = slice(BURN_IN, BURN_IN + N_MATCH)
    wall: dict[str, list] = {"sa": [], "mem": []}
    cpu: dict[str, list] = {"sa": [], "mem": []}
    res = {}
    for _ in range(rounds):
        for kind, m in ms.items():
            w, c = time.perf_counter(), time.process_time()
            res[kind] = m.match(P[s], C[s], L[s], T[s])
            wall[kind].append(time.perf_counter() - w)
            cpu[kind].append(time.process_time() - c)
    same = int((res["sa"].rule == res["mem"].rule).sum())
    same_agree = int((res["sa"].agree == res["mem"].agree).sum())
    med = lambda x: float(np.median(x))  # noqa: E731
    return dict(n_tokens=len(sa), n=N_MATCH, rounds=rounds, sa_wall=med(wall["sa"]), mem_wall=med(wall["mem"]),
                sa_cpu=med(cpu["sa"]), mem_cpu=med(cpu["mem"]), mem_tables_build_s=mem_build, same_rule=same,
                same_agreement=same_agree, mem_tables_mb=mem.nbytes() / 2**20, setup_s=t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="0.5,5", help="training tokens in millions (0.5 = train-1097.txt)")
    ap.add_argument("--out", default="/tmp/tinyscope-bench-rules")
    ap.add_argument("--match-sizes", default="0.5,5", help="sizes (millions) whose index also gets matched")
    ap.add_argument("--all-sizes", default="0.5,1", help="sizes (millions) where R_all's peak memory is measured")
    ap.add_argument("--part", default=None)
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--kind", default="sa")
    ap.add_argument("--rule-set", default="subgram")
    ap.add_argument("--n-match", type=int, default=N_MATCH)
    a = ap.parse_args()
    out = Path(a.out)
    if a.part:
        fn = {"tokens": lambda: part_tokens(out), "build": lambda: part_build(out, a.n), "inputs": lambda: part_inputs(out),
              "match": lambda: part_match(out, a.n, a.kind, a.rule_set, a.n_match),
              "compare": lambda: part_compare(out, a.n)}[a.part]
        print(json.dumps(fn()))
        return
    if not (MODEL.exists() and TRAIN.exists() and all(p.exists() for p in EXTRA)):
        raise SystemExit(f"needs {MODEL} and the shared TinyStories text in {TS}")
    out.mkdir(parents=True, exist_ok=True)
    sizes = lambda s: [int(float(x) * 1e6) for x in s.split(",") if x]  # noqa: E731
    toks = run_part(__file__, ["--part", "tokens", "--out", str(out)])
    print(f"shared text: train-1097 {toks['train']:,} tokens, all shared stories {toks['all']:,} tokens", flush=True)
    builds = {}
    for n in sorted(set(sizes(a.sizes)) | set(sizes(a.match_sizes)) | set(sizes(a.all_sizes))):
        builds[n] = b = run_part(__file__, ["--part", "build", "--out", str(out), "--n", str(n)])
        print(f"build {b['n_tokens']:>12,} tokens: {b['wall_s']:8.1f} s  {b['bytes_per_token']:5.2f} B/token on disk  "
              f"peak RSS {b['peak_rss_mb']:7.0f} MB (before {b['rss_before_mb']:.0f} MB)  "
              f"{(b['peak_rss_mb'] - b['rss_before_mb']) * 2**20 / b['n_tokens']:5.1f} B/token above it", flush=True)
    run_part(__file__, ["--part", "inputs", "--out", str(out)])
    for n in sizes(a.match_sizes):
        for kind in (("sa", "mem") if n <= 600_000 else ("sa",)):
            r = run_part(__file__, ["--part", "match", "--out", str(out), "--n", str(n), "--kind", kind])
            print(f"R_subgram {kind:3s} {r['n_tokens']:>12,} tokens: setup+burn-in {r['setup_s']:6.1f} s, match {r['n']:,} "
                  f"predictions {r['match_s']:6.2f} s ({r['n'] / r['match_s']:,.0f}/s), agreement {r['agreement']:.4f}, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB" + (f", tables {r['tables_mb']:.0f} MB" if r["tables_mb"] else ""), flush=True)
        if n <= 600_000:
            c = run_part(__file__, ["--part", "compare", "--out", str(out), "--n", str(n)])
            print(f"  one process, {c['rounds']} alternating rounds, medians: suffix array {c['sa_wall']:.2f} s wall / "
                  f"{c['sa_cpu']:.2f} s CPU, in-memory {c['mem_wall']:.2f} s / {c['mem_cpu']:.2f} s (+ {c['mem_tables_build_s']:.2f} s "
                  f"to build its {c['mem_tables_mb']:.0f} MB of tables); in-memory/suffix array {c['mem_wall'] / c['sa_wall']:.2f}x wall, "
                  f"{c['mem_cpu'] / c['sa_cpu']:.2f}x CPU; same optimal rule on {c['same_rule']:,}, same agreement on "
                  f"{c['same_agreement']:,} of {c['n']:,}", flush=True)
    for n in sizes(a.all_sizes):
        r = run_part(__file__, ["--part", "match", "--out", str(out), "--n", str(n), "--kind", "mem", "--rule-set", "all", "--n-match", "2000"])
        print(f"R_all {r['n_tokens']:>12,} tokens: setup {r['setup_s']:6.1f} s, {r['n']:,} predictions {r['match_s']:6.2f} s "
              f"({r['n'] / r['match_s']:,.0f}/s), peak RSS {r['peak_rss_mb']:.0f} MB "
              f"({(r['peak_rss_mb'] - r['rss_before_mb']) * 2**20 / r['n_tokens']:.0f} B/token above the start), "
              f"tables {r['tables_mb']:.0f} MB", flush=True)


if __name__ == "__main__":
    main()

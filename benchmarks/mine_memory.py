"""Mining memory at scale: peak RSS and time of `p2d mine` on synthetic pools of 10k to 1M rows.

A tiny random Llama (4 layers, 8 heads, 2 KV heads, hidden 64, a 2,000-token BPE vocabulary
trained here) mines a synthetic JSONL pool at `p2d mine`'s defaults (ifd-rank quality, facility-quality diversity,
10% kept; batch size 64, as a tiny model's batches cost little) with
three heads of a made-up heads.json, so the figures measure p2d's own bookkeeping (reading,
tokenizing, packing, the feature store, FAISS, the exports), not a real model's forward. Each size runs
as its own `p2d mine` process; peak RSS is that process's (wait4), and a size's time includes
tokenization and the exports. Rows are ~40-90 tokens.

    python benchmarks/mine_memory.py                       # 10k, 100k, 1M rows
    python benchmarks/mine_memory.py --rows 2000 --quick   # smoke test, nothing in docs/
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _report import emit, table  # noqa: E402

WORDS = [f"w{i}" for i in range(3000)] + ["def", "return", "sum", "total", "apples", "cost", "list", "sort"]


def tiny_model(path: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = np.random.default_rng(0)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    texts = [" ".join(rng.choice(WORDS, 30)) for _ in range(3000)]
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|eos|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|eos|>", pad_token="<|eos|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=8, vocab_size=len(tok), max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=0, pad_token_id=0, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def heads_json(model: Path, path: Path) -> Path:
    from p2d.geometry import AttentionGeometry
    from p2d.models import load_config
    from p2d.selection import write_heads_json

    geom = AttentionGeometry.from_config(load_config(str(model)))
    scores = np.random.default_rng(0).random((geom.num_layers, geom.num_heads))
    write_heads_json(path, scores, [(1, 2), (2, 5), (3, 0)], geom, model=str(model), task_model=str(model),
                     metric="w1", tau=1.0, head_frac=3 / 32, method="top")
    return path


def write_pool(path: Path, rows: int, seed: int) -> None:
    """Synthetic instruction rows, written in blocks so that building a 1M-row file stays small."""
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, rows, 50_000):
            n = min(50_000, rows - start)
            words = rng.choice(WORDS, size=(n, 28))
            cut = rng.integers(6, 14, n)
            f.writelines(json.dumps({"id": f"r{start + i}", "instruction": " ".join(words[i, :cut[i]]),
                                     "input": "", "output": " ".join(words[i, cut[i]:])}) + "\n" for i in range(n))


def run_mine(args: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS in MiB, exit code) of one `p2d mine` process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "p2d.cli.main", "mine", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"p2d mine failed ({proc.returncode}):\n{err[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--quick", action="store_true", help="nothing written to docs/")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="p2d-mine-memory-"))
    try:
        model = tiny_model(work / "model")
        heads = heads_json(model, work / "heads.json")
        write_pool(work / "target.jsonl", 64, seed=99)
        rows = []
        for n in args.rows:
            pool = work / f"pool-{n}.jsonl"
            write_pool(pool, n, seed=n)
            seconds, rss, _ = run_mine(["--model", str(model), "--heads", str(heads), "--data", str(pool),
                                        "--target", str(work / "target.jsonl"), "--data-frac", "0.1",
                                        "--batch-size", "64",
                                        "--out", str(work / f"out-{n}")])
            summary = json.loads((work / f"out-{n}" / "mine.json").read_text())
            rows.append({"rows": n, "pool MB": round(pool.stat().st_size / 2**20, 1), "peak RSS MiB": round(rss),
                         "seconds": round(seconds, 1), "ms per row": round(1000 * seconds / n, 3),
                         "selected": summary["counts"]["selected"],
                         "extract s": round(summary["timings"].get("extract_s", 0.0), 1)})
            print(rows[-1], flush=True)
            shutil.rmtree(work / f"out-{n}", ignore_errors=True)
            pool.unlink()
        md = (table(rows, ["rows", "pool MB", "peak RSS MiB", "seconds", "ms per row", "extract s", "selected"])
              + "\n\nPeak RSS is the whole `p2d mine` process (Python, torch, the packed pool, the feature store's "
                "memory maps, FAISS and the exports). Issue #15's target: under 2 GB at 1M rows, time linear in rows.")
        emit("mine_memory", "Mining memory at scale (synthetic pools, tiny model)", md, {"rows": rows},
             work if args.quick else None)
        if args.quick:
            print(md)
    finally:
        if not args.quick:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

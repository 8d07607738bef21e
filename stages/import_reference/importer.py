"""Import the reference's own self-powered data: ``{instruction, audio, text}`` lines as answers.

Each line becomes a row of a responses table (the shape generate writes), so the build stage uses the
reference's answers exactly as it uses generated ones; every line that cannot be used is a reject naming
file, line, field and reason.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from core.catalog import Catalog
from core.paths import ImportPaths
from core.prompts import text_prompt
from core.tables import read_transcripts, write_table
from core.text import transcript_of
from schemas import REJECTS, RESPONSES, reject_row, to_table
from stages.import_reference.mapper import InstructionMapper


@dataclass
class ImportSummary:
    lines: int
    answers: int
    rejects: int
    reject_counts: dict[str, int]
    by_task: dict[str, int]


def import_reference(
    manifest: Path,
    root: Path,
    transcripts: Path,
    out: ImportPaths | Path,
    catalog: Catalog,
    prompt_format: str = "vicuna_v1.1",
    tokenizer=None,
    transcript_form: str = "readable",
    kinds: dict[str, str] | None = None,
) -> ImportSummary:
    """The reference's ``{instruction, audio, text}`` lines -> a responses table and a rejects table
    (``ImportPaths``, or a folder to hold them).

    ``audio`` is resolved against ``root`` (and must stay inside it, as in harvest). A line becomes an
    answer when its instruction maps to a category, its audio exists, and that audio is a harvested
    utterance (matched by resolved path and segment), whose transcript makes the prompt. Every other line
    is a reject naming file, line, field and reason; none is dropped silently.
    """
    out = out if isinstance(out, ImportPaths) else ImportPaths(Path(out))
    mapper = InstructionMapper(catalog)
    root = Path(root).resolve()
    by_path: dict[str, list[dict]] = defaultdict(list)
    for t in read_transcripts(transcripts).to_pylist():
        by_path[t["audio_path"]].append(t)
    tag = "reference:" + hashlib.sha256(Path(manifest).read_bytes()).hexdigest()[:16]
    rows, rejects, seen = [], [], set()
    lines = Path(manifest).read_bytes().splitlines()
    for lineno, raw in enumerate(lines, start=1):
        source = f"{manifest}:{lineno}"
        if not raw.strip():
            continue

        def reject(fld: str, reason: str, detail: str, utt: str | None = None, source: str = source) -> None:
            rejects.append(reject_row("reference", source, utt, fld, reason, detail))

        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            reject("line", "bad_json", str(e))
            continue
        if not isinstance(rec, dict):
            reject("line", "bad_json", "expected a JSON object")
            continue
        bad = next((k for k in ("instruction", "audio", "text") if not isinstance(rec.get(k), str)), None)
        if bad:
            reject(bad, f"missing_{bad}", f"field {bad!r} is missing or not a string")
            continue
        if not rec["text"].strip():
            reject("text", "empty_answer", "the answer is empty")
            continue
        task, how = mapper.category(rec["instruction"])
        if task is None:
            reject("instruction", "unknown_instruction", how)
            continue
        # The reference appends ":start:frames" to a path for a segment of a long file.
        path_s, seg = rec["audio"], None
        parts = path_s.rsplit(":", 2)
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            path_s, seg = parts[0], (int(parts[1]), int(parts[2]))
        p = Path(path_s)
        resolved = (p if p.is_absolute() else root / p).resolve()
        if not resolved.is_relative_to(root):
            reject("audio", "outside_root", f"{path_s} resolves outside the root {root}")
            continue
        if not resolved.is_file():
            reject("audio", "missing_audio", f"{resolved} does not exist")
            continue
        cands = by_path.get(str(resolved), [])
        if seg is not None:
            cands = [t for t in cands if abs(t["offset_s"] * t["sample_rate_hz"] - seg[0]) < 1]
        if len(cands) != 1:
            why = "is not among the harvested transcripts" if not cands else "matches several utterances"
            reject("audio", "not_harvested" if not cands else "ambiguous_audio", f"{resolved} {why}")
            continue
        t = cands[0]
        if (t["utt_id"], task, rec["instruction"]) in seen:
            reject("line", "duplicate_line", f"{t['utt_id']}/{task} with this instruction came earlier")
            continue
        seen.add((t["utt_id"], task, rec["instruction"]))
        prompt = text_prompt(
            rec["instruction"], transcript_of(t, transcript_form, kinds), prompt_format, tokenizer
        )
        rows.append(
            dict(
                utt_id=t["utt_id"],
                task=task,
                instruction_id=f"{task}/ref:{hashlib.sha256(rec['instruction'].encode()).hexdigest()[:8]}",
                instruction=rec["instruction"],
                prompt=prompt,
                answer=rec["text"].strip(),
                model=tag,
                finish_reason="imported",
                prompt_tokens=0,
                completion_tokens=0,
                request_key=hashlib.sha256(
                    f"{source}\0{raw.decode('utf-8', 'replace')}".encode()
                ).hexdigest(),
                sampling=json.dumps({"source": str(manifest), "line": lineno, "matched": how}),
            )
        )
    write_table(to_table(rows, RESPONSES), out.responses, RESPONSES)
    write_table(to_table(rejects, REJECTS), out.rejects, REJECTS)
    return ImportSummary(
        len([ln for ln in lines if ln.strip()]),
        len(rows),
        len(rejects),
        dict(Counter(r["reason"] for r in rejects).most_common()),
        dict(sorted(Counter(r["task"] for r in rows).items())),
    )

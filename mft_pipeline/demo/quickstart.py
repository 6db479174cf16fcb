"""`mft quickstart`: the whole pipeline on the real SmolLM2-135M and real corpora, sized for a CPU.

Specialized domain: ScanCode's license texts (legal). General domain: the GCIDE dictionary.
Stage one caches the teacher once; stage two trains MFT and, for comparison, plain FT from
that one cache, and prints S, DG and DG/S for both.
"""

from __future__ import annotations

from pathlib import Path

from mft_pipeline.cache.build import build_cache
from mft_pipeline.cache.format import MANIFEST
from mft_pipeline.config import DEFAULT_MODEL, CacheConfig, TrainConfig
from mft_pipeline.demo.corpora import prepare_corpus
from mft_pipeline.train.loop import SUMMARY, train


def run_quickstart(workdir: str | Path, model: str = DEFAULT_MODEL, steps: int = 16, compare_ft: bool = True) -> dict[str, dict]:
    """Run stage one and stage two; returns each method's summary. Finished parts are reused."""
    workdir = Path(workdir)
    data = workdir / "data"
    legal = prepare_corpus("legal", data, max_documents=400)
    general = prepare_corpus("gcide", data, max_documents=200)
    cache = workdir / "cache"
    if not (cache / MANIFEST).exists():
        build_cache(
            CacheConfig(
                corpus=str(legal), out=str(cache), model=model, seq_len=128, top_k=20, val_fraction=0.1,
                max_train_sequences=64, max_val_sequences=16, batch_size=8, resume=cache.exists(),
            )
        )
    summaries = {}
    for variant in ("mft", "ft") if compare_ft else ("mft",):
        out = workdir / f"run-{variant}"
        if (out / SUMMARY).exists():
            import json

            summaries[variant] = json.loads((out / SUMMARY).read_text())
            continue
        summaries[variant] = train(
            TrainConfig(
                cache=str(cache), out=str(out), variant=variant, tau=0.25, steps=steps, batch_size=4, lr=1e-4,
                warmup_steps=2, eval_every=max(1, steps // 2), general_eval=str(general), general_max_sequences=16,
                resume=out.exists(),
            )
        )
    return summaries

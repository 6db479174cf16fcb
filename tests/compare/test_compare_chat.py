"""`mft compare` on a chat corpus: its size is counted in rendered tokens and S on the answers only."""

import csv
import json
import shutil

from click.testing import CliRunner
from transformers import AutoTokenizer

from cli.main import mft
from conftest import make_documents, write_jsonl
from mft_pipeline.cache.reader import Cache
from mft_pipeline.compare.runs import open_corpus, size_warnings
from test_stage_one_chat import TEMPLATE, chat_rows


def with_template(model_dir, out):
    """A copy of the tiny model whose tokenizer has a chat template of its own, as an instruct model's has."""
    shutil.copytree(model_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def test_size_warnings_count_a_chat_corpus_as_rendered(tmp_path, tiny_model_dir):
    rows = chat_rows(40)
    corpus = tmp_path / "chat.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = AutoTokenizer.from_pretrained(with_template(tiny_model_dir, tmp_path / "templated"))
    split = open_corpus("d", corpus, val_fraction=0.3)

    def rendered(records):  # by hand: the template's text, then the EOS every record ends with
        return sum(len(tokenizer(f"user: {r.completion[0]['content']}\nassistant: {r.completion[1]['content']}\n")["input_ids"]) + 1 for r in records)

    val, train = rendered(split.validation), rendered(split.train)
    assert size_warnings("domain d", split, tokenizer, val, train) == []
    notes = size_warnings("domain d", split, tokenizer, val + 1, train + 1)
    assert f"hold {val:,} tokens, fewer than the {val + 1:,}" in notes[0] and f"hold {train:,} tokens" in notes[1]


def test_smoke_compare_on_a_chat_domain_scores_the_answers(tmp_path, tiny_model_dir):
    model = with_template(tiny_model_dir, tmp_path / "chat-model")
    domain = tmp_path / "qa.jsonl"
    domain.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(60)))
    general = write_jsonl(tmp_path / "general.jsonl", make_documents(60, seed=6))
    result = CliRunner().invoke(mft, ["compare", "--profile", "smoke", "--model", str(model), "--domain", f"qa={domain}", "--general", str(general),
                                      "--seeds", "1", "--skip", "frontier,fidelity,low-data", "--out", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 0, result.output
    (runs,) = (tmp_path / "out").rglob("runs.csv")
    rows = list(csv.DictReader(open(runs)))
    assert {r["method"] for r in rows} == {"FT", "MFT"} and all(r["S"] for r in rows)
    (cache,) = (p.parent for p in (tmp_path / "out" / "work").rglob("manifest.json") if p.parent.name.startswith("cache-qa"))
    validation = Cache(cache).split("validation")
    # S's token count is the answers' tokens, fewer than the validation rows' labels.
    assert Cache(cache).manifest["targets"] is True
    assert {int(r["spec_eval_tokens"]) for r in rows} == {validation.target_tokens} and validation.target_tokens < validation.num_tokens.sum() - len(validation)

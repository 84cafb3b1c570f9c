"""Preference pairs (data/pairs.py) on the tiny model's tokenizer (Llama 3.1 chat template).

Labels are checked against readings of our own: for chat, each response's assistant content is found in the
rendered text by plain string search (from the end: it is the last turn) and a token is trained when its
character range overlaps content + "<|eot_id|>"; for raw strings, the trained tokens decode to the response
and EOS and the others to BOS and the prompt.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from llama_ft.data import IGNORE_INDEX
from llama_ft.data.pairs import PAIR_COLUMNS, check_pair, encode_pair, encode_pair_batch
from llama_ft.data.readers import LINE, Locator, RowRef
from llama_ft.errors import UserError

HEAD = "<|start_header_id|>assistant<|end_header_id|>\n\n"
EOT = "<|eot_id|>"


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def reference(tok, messages: list[dict], response: list[dict]) -> tuple[list[int], list[int]]:
    """ids and labels of prompt + response read by hand: only the response's assistant contents are trained."""
    text = tok.apply_chat_template(messages + response, tokenize=False)
    spans, end = [], len(text)
    for m in reversed(response):  # the response is the tail of the text: search backwards
        piece = HEAD + m["content"].strip() + EOT
        at = text.rindex(piece, 0, end)
        spans.append((at + len(HEAD), at + len(piece)))
        end = at
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [i if any(s < e2 and e > s2 for s2, e2 in spans) else IGNORE_INDEX
              for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]
    return list(enc["input_ids"]), labels


def _encode(tok, row: dict, chat: bool = True) -> dict[str, list[int]]:
    return encode_pair(check_pair(row, chat, "t"), tok, 1024, 256, "t")


PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky colour?"},
          {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And at night?"}]
GOOD = [{"role": "assistant", "content": "Black, with stars."}]
BAD = [{"role": "assistant", "content": " Purple "}]


@pytest.mark.parametrize("form", ["implicit", "explicit", "strings"])
def test_chat_pair_labels_match_offsets_reference(tok, form):
    if form == "implicit":
        row, prompt = {"chosen": PROMPT + GOOD, "rejected": PROMPT + BAD}, PROMPT
    elif form == "explicit":
        row, prompt = {"prompt": PROMPT, "chosen": GOOD, "rejected": BAD}, PROMPT
    else:
        row = {"prompt": "Sky colour?", "chosen": GOOD[0]["content"], "rejected": BAD[0]["content"]}
        prompt = [{"role": "user", "content": "Sky colour?"}]
    got = _encode(tok, row)
    assert set(got) == set(PAIR_COLUMNS)
    for side, response in (("chosen", GOOD), ("rejected", BAD)):
        ids, labels = reference(tok, prompt, response)
        assert got[f"{side}_input_ids"] == ids == tok.apply_chat_template(prompt + response)["input_ids"]
        assert got[f"{side}_labels"] == labels
        trained = [t for t in labels if t != IGNORE_INDEX]
        assert tok.decode(trained) == response[0]["content"].strip() + EOT  # the prompt's "Blue." is not trained


def test_response_of_several_assistant_messages_is_all_trained(tok):
    chosen = [{"role": "assistant", "content": "Dark."}, {"role": "assistant", "content": "Starry."}]
    got = _encode(tok, {"prompt": PROMPT, "chosen": chosen, "rejected": BAD})
    ids, labels = reference(tok, PROMPT, chosen)
    assert got["chosen_input_ids"] == ids and got["chosen_labels"] == labels
    assert sum(t != IGNORE_INDEX for t in labels) > 2 * len(tok("Dark.", add_special_tokens=False)["input_ids"])


def test_raw_strings_are_prompt_then_response_and_eos(tok):
    row = {"prompt": "Q: sky colour?\nA:", "chosen": " blue", "rejected": " green, of course"}
    got = _encode(tok, row, chat=False)
    for side in ("chosen", "rejected"):
        ids, labels = got[f"{side}_input_ids"], got[f"{side}_labels"]
        assert len(ids) == len(labels) and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        trained = [t for t, y in zip(ids, labels, strict=True) if y != IGNORE_INDEX]
        assert [y for y in labels if y != IGNORE_INDEX] == trained
        untrained = ids[: len(ids) - len(trained)]
        assert labels[: len(untrained)] == [IGNORE_INDEX] * len(untrained)  # the prompt first, then the response
        assert tok.decode(trained) == row[side] + tok.eos_token
        assert tok.decode(untrained) == tok.bos_token + row["prompt"]


def test_batch_names_rows_by_line_and_keeps_order(tok):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e", "rejected": "f"}]
    batch = {k: [r[k] for r in rows] for k in rows[0]} | {LINE: [3, 5]}
    out = encode_pair_batch(batch, [0, 1], tokenizer=tok, chat=False, source_max_len=64, target_max_len=64,
                            where=Locator("pairs.jsonl", "lines"))
    assert out["chosen_input_ids"][1] == _encode(tok, rows[1], chat=False)["chosen_input_ids"]
    bad = {**batch, "rejected": ["c", "e"]}
    with pytest.raises(UserError) as e:
        encode_pair_batch(bad, [0, 1], tokenizer=tok, chat=False, source_max_len=64, target_max_len=64,
                          where=Locator("pairs.jsonl", "lines"))
    assert str(e.value) == "pairs.jsonl: line 5: 'chosen' and 'rejected' are identical (nothing to prefer)"


BAD_ROWS = [
    ({"prompt": "p", "rejected": "r"}, True, "missing field 'chosen'"),
    ({"prompt": "p", "chosen": "c"}, False, "missing field 'rejected'"),
    ({"chosen": "c", "rejected": "r"}, False, "missing field 'prompt'"),
    ({"chosen": "c", "rejected": "r"}, True, "missing field 'prompt'"),
    ({"prompt": "p", "chosen": "  ", "rejected": "r"}, False, "the 'chosen' response is empty"),
    ({"prompt": "p", "chosen": "c", "rejected": ""}, True, "the 'rejected' response is empty"),
    ({"prompt": PROMPT, "chosen": [{"role": "assistant", "content": ""}], "rejected": BAD}, True,
     "the 'chosen' response is empty"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, False, "'chosen' and 'rejected' are identical"),
    ({"prompt": PROMPT, "chosen": GOOD, "rejected": GOOD}, True, "'chosen' and 'rejected' are identical"),
    ({"prompt": "p", "chosen": "same", "rejected": " same "}, True, "encode to the same tokens"),
    ({"chosen": PROMPT + GOOD, "rejected": PROMPT[:1] + [{"role": "user", "content": "Other?"}] + PROMPT[2:] + BAD},
     True, "differ before their last message (at message 1)"),
    ({"chosen": PROMPT + GOOD, "rejected": PROMPT[:2] + BAD}, True, "differ before their last message"),
    ({"chosen": PROMPT + GOOD, "rejected": PROMPT + [{"role": "user", "content": "x"}]}, True,
     "rejected[0] has role 'user'"),
    ({"prompt": PROMPT, "chosen": GOOD, "rejected": [{"role": "bot", "content": "x"}]}, True,
     "rejected[0]: unknown role 'bot'"),
    ({"prompt": PROMPT, "chosen": GOOD, "rejected": BAD}, False, "need --dataset_format chat"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, False, "field 'chosen' must be a string or a list"),
    (["not", "an", "object"], True, "expected a JSON object"),
]


@pytest.mark.parametrize("row,chat,message", BAD_ROWS)
def test_bad_pairs_are_one_line_with_file_and_line(tok, row, chat, message):
    where = Locator("pairs.jsonl", "lines")
    with pytest.raises(UserError) as e:
        if isinstance(row, dict):
            batch = {k: [v] for k, v in row.items()} | {LINE: [7]}
            encode_pair_batch(batch, [0], tokenizer=tok, chat=chat, source_max_len=64, target_max_len=64,
                              where=where)
        else:  # a batch of columns cannot hold a row that is not an object: check it alone
            check_pair(row, chat, RowRef(where, 0, 7))
    text = str(e.value)
    assert "\n" not in text and text.startswith("pairs.jsonl: line 7: ") and message in text, text


def test_pipeline_reads_pairs_cuts_drops_and_caches(tok, tmp_path):
    """--objective dpo through prepare_examples: the three row forms from a .jsonl file, each pair equal to its
    hand-read reference; --max_seq_len cuts both sides, and a pair whose response is cut away entirely, or whose
    two sides become the same tokens, is dropped and counted; the second read comes from the cache."""
    import json

    from llama_ft.data import DataOptions, prepare_examples

    long = " ".join(["word"] * 40)
    rows = [{"prompt": PROMPT, "chosen": GOOD, "rejected": BAD},
            {"chosen": [PROMPT[1], GOOD[0]], "rejected": [PROMPT[1], BAD[0]]},
            {"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Green."},
            {"prompt": long, "chosen": "Yes " + long, "rejected": "Yes " + long + " no"},
            {"prompt": "Sky colour?", "chosen": "Blue " * 60, "rejected": "Grey " * 60}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sides = [reference(tok, PROMPT, GOOD), reference(tok, PROMPT, BAD),
             reference(tok, [PROMPT[1]], GOOD), reference(tok, [PROMPT[1]], BAD),
             reference(tok, [{"role": "user", "content": "Sky colour?"}], [{"role": "assistant", "content": "Blue."}]),
             reference(tok, [{"role": "user", "content": "Sky colour?"}], [{"role": "assistant", "content": "Green."}])]
    opts = DataOptions(str(path), "chat", objective="dpo")
    examples, stats = prepare_examples(opts, tok, tmp_path / "cache")
    assert (stats.rows, stats.examples, stats.cut, stats.dropped, stats.from_cache) == (5, 5, 0, 0, False)
    for k in range(3):
        assert examples[k] == {"chosen_input_ids": sides[2 * k][0], "chosen_labels": sides[2 * k][1],
                               "rejected_input_ids": sides[2 * k + 1][0], "rejected_labels": sides[2 * k + 1][1]}
    assert prepare_examples(opts, tok, tmp_path / "cache")[1].from_cache

    # a cut inside the last pair's response, where its two sides still agree ("Yes word ... word"): dropped;
    # the others are cut there too when longer, and dropped when a side keeps no trained token
    user = [{"role": "user", "content": long}]
    last = (reference(tok, user, [{"role": "assistant", "content": rows[3]["chosen"]}]),
            reference(tok, user, [{"role": "assistant", "content": rows[3]["rejected"]}]))
    cut = len(reference(tok, user, [{"role": "assistant", "content": "x"}])[0]) + 5
    sky = [{"role": "user", "content": "Sky colour?"}]
    longer = tuple(reference(tok, sky, [{"role": "assistant", "content": rows[4][side].strip()}])
                   for side in ("chosen", "rejected"))
    pairs = [(sides[2 * k], sides[2 * k + 1]) for k in range(3)] + [last, longer]
    cut_pairs = [tuple((ids[:cut], labels[:cut]) for ids, labels in pair) for pair in pairs]
    kept = [(k, p) for k, p in enumerate(cut_pairs)
            if p[0] != p[1] and all(any(y != IGNORE_INDEX for y in labels[1:]) for _, labels in p)]
    assert 3 not in dict(kept) and last[0][0][:cut] == last[1][0][:cut]  # the same tokens after the cut
    assert any(len(pairs[k][0][0]) > cut for k, _ in kept)  # a kept pair is really cut
    examples, stats = prepare_examples(DataOptions(str(path), "chat", max_seq_len=cut, objective="dpo"), tok,
                                       tmp_path / "cache")
    n_cut = sum(len(pairs[k][0][0]) > cut or len(pairs[k][1][0]) > cut for k, _ in kept)
    assert (stats.rows, stats.examples, stats.cut, stats.dropped) == (5, len(kept), n_cut, 5 - len(kept)), stats
    for e, (_, (c, r)) in zip(examples, kept, strict=True):
        assert e == {"chosen_input_ids": c[0], "chosen_labels": c[1], "rejected_input_ids": r[0],
                     "rejected_labels": r[1]}


def test_packed_pairs_lay_out_each_side_as_its_own_sequence():
    """collate_packed_pairs against the layout written out by hand: pair k's chosen side is sequence k, its
    rejected side P + k; each side's tokens sit contiguously, positions restart at 0, its labels are its own
    (its first one IGNORE_INDEX), and padding belongs to no sequence."""
    import torch

    from llama_ft.data.collate import collate_packed_pairs

    def side(n: int, start: int, prompt: int) -> tuple[list[int], list[int]]:
        ids = list(range(start, start + n))
        return ids, [IGNORE_INDEX] * prompt + ids[prompt:]

    pairs = []
    for k, (nc, nr) in enumerate([(5, 3), (4, 6), (2, 7)]):
        (ci, cl), (ri, rl) = side(nc, 100 * k, 1), side(nr, 100 * k + 50, 1)
        pairs.append({"chosen_input_ids": ci, "chosen_labels": cl, "rejected_input_ids": ri, "rejected_labels": rl})
    b = collate_packed_pairs([[pairs[0], pairs[1]], [pairs[2]]], pad_token_id=9)
    assert b["pairs"] == 3 and b["input_ids"].shape == (2, 18)
    for k, p in enumerate(pairs):
        for s, name in ((k, "chosen"), (3 + k, "rejected")):
            row, cols = torch.nonzero(b["sequence_ids"] == s, as_tuple=True)
            assert len(set(row.tolist())) == 1 and cols.tolist() == list(range(cols[0], cols[0] + len(cols)))
            r = row[0]
            assert b["input_ids"][r, cols].tolist() == p[f"{name}_input_ids"]
            assert b["position_ids"][r, cols].tolist() == list(range(len(cols)))
            assert b["labels"][r, cols].tolist() == [IGNORE_INDEX, *p[f"{name}_labels"][1:]]
    pad = b["sequence_ids"] == -1
    assert pad.sum() == 18 - (2 + 7) and (b["input_ids"][pad] == 9).all() and (b["labels"][pad] == IGNORE_INDEX).all()
    assert b["sequence_ids"][0, :5].tolist() == [0] * 5 and b["sequence_ids"][0, 5:8].tolist() == [3] * 3

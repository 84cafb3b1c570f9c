"""Bad inputs: the CI slice of the fuzzer (benchmarks/fuzz_inputs.py), and one regression test per thing it found.

The rule every case is held to: accepted (exit 0, and then it printed or wrote what it should), or a non-zero
exit with one error line naming the file or the flag; never a traceback, never a hang.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from fuzz_inputs import Case, Seeds, fuzz, run_case, table

SEED = 20261207


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Seeds:
    return Seeds(tmp_path_factory.mktemp("fuzz")).make()


def test_fuzz_slice_every_case_accepted_or_named(seeds):
    """700 seeded cases, 100 per kind of input (about 15 s): every one follows the rule."""
    outcomes = fuzz(700, SEED, seeds.work)
    bad = [o for o in outcomes if o.verdict not in ("accepted", "rejected")]
    assert not bad, "\n".join(f"{o.case.target} {o.case.mutation} {o.case.argv}: {o.verdict}: {o.detail[-600:]}"
                              for o in bad[:5]) + "\n" + table(outcomes)
    # the slice reaches both sides of the rule for every kind of input (a seed that only broke files, or only
    # made valid ones, would test nothing)
    seen = Counter((o.case.target, o.verdict) for o in outcomes)
    for target in ("data", "config", "hostfile", "adapter", "model", "flags", "parquet"):
        assert seen[(target, "rejected")] >= 10 and seen[(target, "accepted")] >= 1, table(outcomes)


def test_the_same_seed_draws_the_same_cases(seeds):
    a = [(o.case.target, o.case.mutation, o.verdict) for o in fuzz(30, 7, seeds.work)]
    b = [(o.case.target, o.case.mutation, o.verdict) for o in fuzz(30, 7, seeds.work)]
    assert a == b


def _copy_model(seeds: Seeds, tmp: Path) -> Path:
    import shutil

    return Path(shutil.copytree(seeds.tiny, tmp / "model"))


def _merge(base: Path, adapter: Path, tmp: Path, names: list[str]) -> Case:
    return Case("t", "t", ["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(tmp / "out"),
                           "--no-progress"], names)


def _rejected(case: Case, needle: str) -> None:
    o = run_case(case, timeout=60)
    assert o.verdict == "rejected" and needle in o.detail, (o.verdict, o.detail)


# --- found by the fuzzer, each a traceback before its fix ---

def test_index_naming_a_shard_by_a_number(seeds, tmp_path):
    m = _copy_model(seeds, tmp_path)
    idx = json.loads((m / "model.safetensors.index.json").read_text())
    idx["weight_map"][next(iter(idx["weight_map"]))] = 3
    (m / "model.safetensors.index.json").write_text(json.dumps(idx))
    _rejected(_merge(m, seeds.adapter, tmp_path, [str(m)]), "'weight_map' names 3 as the shard of")


@pytest.mark.parametrize("entry", [{"shape": [[4]]}, {"dtype": 7}, {"data_offsets": ["0", 8]}])
def test_safetensors_header_entry_of_the_wrong_type(seeds, tmp_path, entry):
    m = _copy_model(seeds, tmp_path)
    shard = sorted(m.glob("model-*.safetensors"))[0]
    _rewrite_header(shard, lambda h: h[next(k for k in h if k != "__metadata__")].update(entry))
    _rejected(_merge(m, seeds.adapter, tmp_path, [str(shard)]), "corrupt safetensors header entry")


def test_safetensors_offsets_that_do_not_fit_the_shape(seeds, tmp_path):
    """A header whose entries are well typed but whose byte range does not match shape x dtype (once sized a merge
    output at 1e36 MiB)."""
    m = _copy_model(seeds, tmp_path)
    shard = sorted(m.glob("model-*.safetensors"))[0]

    def shrink(h: dict) -> None:
        meta = h[next(k for k in h if k != "__metadata__")]
        meta["shape"] = [1] * len(meta["shape"])

    _rewrite_header(shard, shrink)
    _rejected(_merge(m, seeds.adapter, tmp_path, [str(shard)]), "does not fit its")
    meta = {}
    _rewrite_header(shard, lambda h: meta.update(h[next(k for k in h if k != "__metadata__")]))
    _rewrite_header(shard, lambda h: h[next(k for k in h if k != "__metadata__")].update(shape=[10**12, 10**12]))
    _rejected(_merge(m, seeds.adapter, tmp_path, [str(shard)]), "does not fit its")


def _rewrite_header(path: Path, change) -> None:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + n])
    change(header)
    raw = json.dumps(header).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


@pytest.mark.parametrize("field,value,needle", [
    ("lora_alpha", "16", "field 'lora_alpha' is '16' (expected a number)"),
    ("lora_alpha", 1e308, "beyond float32"),
    ("r", True, "field 'r' is True"),
    ("target_modules", True, "field 'target_modules' is True"),
    ("rank_pattern", 0.5, "field 'rank_pattern' is 0.5"),
    ("alpha_pattern", {"q_proj": "x"}, "field 'alpha_pattern'"),
])
def test_adapter_config_values_of_the_wrong_type(seeds, tmp_path, field, value, needle):
    import shutil

    a = Path(shutil.copytree(seeds.adapter, tmp_path / "adapter"))
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg[field] = value
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    _rejected(_merge(seeds.tiny, a, tmp_path, [str(a)]), needle)


def test_config_path_with_a_nul_byte():
    _rejected(Case("t", "t", ["config", "run\x00.yaml"], ["run"]), "cannot be read")


def test_empty_dataset_flag_names_the_flag(seeds):
    _rejected(Case("t", "t", ["data", "--model_name_or_path", str(seeds.tiny), "--dataset", ""], ["--dataset"]),
              "--dataset '': empty")


def test_token_length_beyond_32_bits(seeds):
    _rejected(Case("t", "t", ["data", "--model_name_or_path", str(seeds.tiny), "--source_max_len", str(2**40)],
                   ["--source_max_len"]), "--source_max_len must be an integer >= 1 and <=")


def test_mutations_are_seeded():
    from fuzz_inputs import byte_mutations

    data = b'{"instruction": "a", "output": "b"}\n' * 4
    assert [byte_mutations(data, random.Random(3)) for _ in range(2)][0] == byte_mutations(data, random.Random(3))


def test_a_refused_valid_input_is_a_failure(seeds, tmp_path):
    """A case marked must_accept (a Parquet file whose layout only changed) that is refused counts as 'wrong'."""
    f = tmp_path / "train.parquet"
    f.write_bytes(b"PAR1")
    case = Case("t", "t", ["data", "--dataset", str(f), "--model_name_or_path", str(seeds.tiny)], [str(f)],
                must_accept=True)
    o = run_case(case, timeout=60)
    assert o.verdict == "wrong" and "a valid input was refused" in o.detail, (o.verdict, o.detail)


@pytest.mark.parametrize("mutation", ["tiny_row_groups", "large_string", "dictionary", "intact"])
def test_parquet_layout_changes_keep_every_row(seeds, tmp_path, mutation):
    """The Parquet target's layout-only tables, written and read back by pyarrow, hold the seed rows unchanged
    (so the fuzzer's 'accepted with every row' check is a fair one)."""
    import pyarrow.parquet as pq
    from fuzz_inputs import _parquet_rows, _table_mutation

    rows = _parquet_rows("alpaca")
    rng = random.Random(0)
    while True:
        kind, table, opts = _table_mutation(rows, rng)
        if kind == mutation:
            break
    pq.write_table(table, tmp_path / "t.parquet", **opts)
    back = pq.read_table(tmp_path / "t.parquet")
    assert back.to_pylist() == rows
    if mutation == "tiny_row_groups":
        assert pq.ParquetFile(tmp_path / "t.parquet").metadata.num_row_groups == len(rows)

"""Every reader of a file that a crash can tear or a person can edit answers garbage with a named error or a
skipped line, never a crash: the feature store's ledger and quarantine, manifests, a spool's records and run ids,
and a checkpoint's manifest. Hypothesis writes the garbage; each reader is also given the valid lines around it."""

import json
import re
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coat.data.manifest import ManifestError, read_manifest
from coat.data.store import FeatureStore, feature_rows
from coat.spool import opened_runs, records
from coat.train.checkpoint import MANIFEST_FILE, first_sound, verify_checkpoint

GARBAGE = st.binary(min_size=1, max_size=200)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def around(garbage: bytes, *lines: str) -> bytes:
    """Valid lines with `garbage` between them, as a torn or hand-edited file holds it."""
    first, *rest = [line.encode() for line in lines]
    return b"\n".join([first, garbage, *rest]) + b"\n"


@FUZZ
@given(garbage=GARBAGE)
def test_the_store_skips_garbled_ledger_and_quarantine_lines(tmp_path_factory, garbage):
    store = FeatureStore(tmp_path_factory.mktemp("store"))
    part = store.write("e", "v1", feature_rows(["a"], [np.ones((2, 2), np.float32)]))
    ledger = part.parent / "parts.jsonl"
    ledger.write_bytes(around(garbage, ledger.read_text().strip(), '{"part": 3}'))
    assert store.present("e", "v1") == {"a"} and store.verify("e", "v1") == []
    store.quarantine([{"clip_hash": "b", "path": "b.wav", "reason": "missing_file"}])
    quarantine = store.root / "quarantine.jsonl"
    quarantine.write_bytes(around(garbage, quarantine.read_text().strip(), '{"clip_hash": 1}', "[1, 2]"))
    assert store.quarantined() == {"b": "missing_file"}


@FUZZ
@given(garbage=GARBAGE)
def test_a_garbled_manifest_is_a_named_error(tmp_path_factory, garbage):
    path = tmp_path_factory.mktemp("manifest") / "manifest.jsonl"
    row = json.dumps({"id": "a", "audio": "a.wav", "task": "emotion", "prompt": "p", "answer": "x", "split": "test"})
    path.write_bytes(around(garbage, row, row.replace('"a"', '"b"')))
    try:
        rows = read_manifest(path)
    except ManifestError as err:
        assert re.match(rf"{re.escape(str(path))}:\d+: ", str(err)), err
    else:  # the garbage happened to be blank or JSON objects: rows like any other, for the quarantine
        assert {"a", "b"} <= set(rows["id"].dropna().astype(str))


@FUZZ
@given(garbage=GARBAGE)
def test_a_spool_skips_garbled_records_and_ids(tmp_path_factory, garbage):
    folder = tmp_path_factory.mktemp("spool")
    (folder / "1-a.jsonl").write_bytes(around(garbage, '{"kind": "log", "run": "r", "seq": 1}',
                                              '{"kind": "end", "run": "r", "seq": 2}'))
    kinds = [r["kind"] for r in records(folder / "1-a.jsonl")]
    assert kinds[0] == "log" and kinds[-1] == "end"
    (folder / "run_ids.json").write_bytes(garbage)
    assert isinstance(opened_runs(folder), dict)


@FUZZ
@given(garbage=GARBAGE)
def test_a_garbled_checkpoint_manifest_falls_back_to_the_one_before(tmp_path_factory, garbage):
    root = tmp_path_factory.mktemp("run")
    older, newer = root / "checkpoint_000002", root / "checkpoint_000004"
    for checkpoint in (older, newer):
        checkpoint.mkdir()
        (checkpoint / "weights.bin").write_bytes(b"w")
        (checkpoint / MANIFEST_FILE).write_text(json.dumps({"files": {"weights.bin": {
            "bytes": 1, "sha256": "50e721e49c013f00c62cf59f2163542a9d8df02464efeb615d31051b0fddc326"}}}))
    assert verify_checkpoint(older) is None
    Path(newer / MANIFEST_FILE).write_bytes(garbage)
    assert verify_checkpoint(newer) is not None
    assert first_sound([newer, older]) == older

"""The answer cache as its files hold it: keys that stay valid across releases, rows as written, lookups that
find every answer however many are asked for, and other workers' caches read without being written."""

import json
import sqlite3

from stages.generate.cache import Answer, AnswerCache, request_key

SAMPLING = {"temperature": 0.0, "max_tokens": 8, "top_p": 1.0}  # not in sorted order on purpose


def test_a_request_key_is_the_same_in_every_release():
    # A cache file outlives the code that wrote it: a rerun with a new release must find the answers a previous
    # one paid for. This digest was computed once; any change to what the key hashes (field names, order,
    # the prompt's hash) changes it, and every cache on disk would be missed.
    key = request_key("tiny-llm", "abc123", "Repeat: hello", SAMPLING)
    assert key == "414fcca1b9b029f640f24126ead95144ac0756f7f2d16a1d12eefbe8f8d419af"
    # sampling parameters in another order are the same request
    assert request_key("tiny-llm", "abc123", "Repeat: hello", dict(reversed(SAMPLING.items()))) == key


def test_a_put_writes_one_row_holding_the_request_and_the_answer(tmp_path):
    path = tmp_path / "c" / "cache.sqlite"
    cache = AnswerCache(path)
    cache.put("k1", "tiny-llm", "Repeat: hello", SAMPLING, Answer("hello", "stop", 5, 2))
    cache.close()
    con = sqlite3.connect(path)
    (row,) = con.execute(
        "SELECT key, model, prompt, sampling, answer, finish_reason, prompt_tokens, completion_tokens FROM answers"
    ).fetchall()
    con.close()
    assert row == (
        "k1",
        "tiny-llm",
        "Repeat: hello",
        '{"max_tokens": 8, "temperature": 0.0, "top_p": 1.0}',  # sorted keys: one text per request
        "hello",
        "stop",
        5,
        2,
    )
    assert json.loads(row[3]) == SAMPLING


def test_more_keys_than_one_query_takes_are_all_found_and_counted(tmp_path):
    cache = AnswerCache(tmp_path / "cache.sqlite")
    keys = [f"k{i:05d}" for i in range(1203)]
    for i, k in enumerate(keys):
        cache.put(k, "m", f"p{i}", SAMPLING, Answer(f"a{i}", "stop", i, 1))
    assert cache.count() == 1203
    asked = [*keys, "absent"]
    found = cache.get_many(asked)
    assert sorted(found) == keys
    assert found["k00500"] == Answer("a500", "stop", 500, 1)
    assert found["k01001"] == Answer("a1001", "stop", 1001, 1)
    assert found["k01202"] == Answer("a1202", "stop", 1202, 1)
    cache.close()


def test_other_workers_caches_are_read_for_what_this_one_lacks_and_left_unchanged(tmp_path):
    a = AnswerCache(tmp_path / "a.sqlite")
    a.put("only-a", "m", "pa", SAMPLING, Answer("from a", "stop", 1, 1))
    a.put("both", "m", "pb", SAMPLING, Answer("a's copy", "stop", 1, 1))
    a.close()
    before = (tmp_path / "a.sqlite").read_bytes()
    b = AnswerCache(
        tmp_path / "b.sqlite",
        read_also=[tmp_path / "a.sqlite", tmp_path / "b.sqlite", tmp_path / "none.sqlite"],
    )
    assert b.others == [tmp_path / "a.sqlite"]  # not itself, not a cache that does not exist
    b.put("both", "m", "pb", SAMPLING, Answer("b's copy", "stop", 2, 2))
    found = b.get_many(["only-a", "both", "neither"])
    assert found == {"only-a": Answer("from a", "stop", 1, 1), "both": Answer("b's copy", "stop", 2, 2)}
    assert b.count() == 1  # what it read from a is not copied into its own file
    b.close()
    assert (tmp_path / "a.sqlite").read_bytes() == before

"""The corpus walk: the same listings in the same order whether this process or a helper process lists them,
and a helper that dies costs nothing but time."""

import os

import pytest

from stages.harvest.corpora import listing


def _tree(root):
    """Three levels, files at every level, a link to a file, a dangling link, an empty directory."""
    for s in range(3):
        for c in range(4):
            d = root / f"s{s}" / f"c{c}"
            d.mkdir(parents=True)
            for u in range(5 + s + c):
                (d / f"{s}-{c}-{u:03d}.flac").write_bytes(b"x" * (u + 1))
            (d / f"{s}-{c}.trans.txt").write_text("lines\n")
        (root / f"s{s}" / "README").write_text("speaker")
    (root / "s0" / "c0" / "link.flac").symlink_to(root / "s1" / "c1" / "1-1-000.flac")
    (root / "s0" / "c1" / "gone.flac").symlink_to(root / "nowhere.flac")
    (root / "empty").mkdir()
    return root


def _here(root):
    return list(listing.walk(str(root), helper=False))


def test_the_walk_is_depth_first_sorted_with_sizes_mtimes_and_dangling_links(tmp_path):
    root = _tree(tmp_path / "t")
    out = _here(root)
    dirs = [d for d, _ in out]
    real = os.path.realpath(root)
    assert dirs[:3] == [real, f"{real}/empty", f"{real}/s0"] and dirs[3] == f"{real}/s0/c0"
    assert len(dirs) == 1 + 1 + 3 + 12
    files = dict(out)[f"{real}/s0/c1"]
    assert [n for n, _, _ in files] == sorted(n for n, _, _ in files)
    assert ("gone.flac", -1, -1) in files  # listed, for the harvest to reject
    st = os.stat(root / "s0" / "c1" / "0-1-002.flac")
    assert ("0-1-002.flac", 3, st.st_mtime_ns) in files
    assert ("link.flac", 1, os.stat(root / "s1" / "c1" / "1-1-000.flac").st_mtime_ns) in dict(out)[
        f"{real}/s0/c0"
    ]


@pytest.mark.parametrize("handoff, batch", [(0, 1), (0, 10_000), (30, 7)])
def test_a_helper_process_gives_the_same_listings_in_the_same_order(
    tmp_path, monkeypatch, capsys, handoff, batch
):
    root = _tree(tmp_path / "t")
    monkeypatch.setattr(listing, "HANDOFF_FILES", handoff)
    monkeypatch.setattr(listing, "BATCH_FILES", batch)
    monkeypatch.setattr(listing, "QUEUED_BATCHES", 2)  # the helper waits for the reader, often
    assert list(listing.walk(str(root), helper=True)) == _here(root)
    assert "listing" not in capsys.readouterr().out  # the helper listed, not this process after it failed


def _dies_after_two_batches(stack, out, batch_files):
    """A helper killed mid-walk (the OOM killer, a signal): it sends two batches, then exits without a word."""
    sent = []

    class Two:
        def put(self, batch):
            if len(sent) == 2:
                os._exit(9)
            sent.append(batch)
            out.put(batch)

    listing._produce(stack, Two(), batch_files)


def test_a_helper_that_dies_mid_walk_leaves_this_process_to_list_the_rest_with_nothing_lost_or_twice(
    tmp_path, monkeypatch, capsys
):
    root = _tree(tmp_path / "t")
    monkeypatch.setattr(listing, "BATCH_FILES", 10)
    monkeypatch.setattr(listing, "_POLL_S", 0.05)
    real = os.path.realpath(root)
    got = list(listing._walk_in_helper([real], produce=_dies_after_two_batches))
    assert got == _here(root)
    assert "the listing process ended (exit code 9)" in capsys.readouterr().out

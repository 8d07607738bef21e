"""The corpus walk: depth first, sorted, every file with its size and mtime, dangling links listed; and the
listing digest that lets a rerun take over an unchanged directory."""

import os

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
    return list(listing.walk(str(root)))


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


def test_the_digest_changes_with_any_name_size_or_mtime_and_takes_names_that_are_not_utf8(tmp_path):
    files = [("a.flac", 10, 1_700_000_000_000_000_001), ("b.flac", 20, 1_700_000_000_000_000_002)]
    d = listing.digest(files)
    assert listing.digest([tuple(f) for f in files]) == d  # the values decide, not which objects hold them
    for changed in (
        [("a.flac", 10, 1_700_000_000_000_000_001)],
        [("a.flac", 11, 1_700_000_000_000_000_001), files[1]],
        [("a.flac", 10, 1_700_000_000_000_000_002), files[1]],
        [("c.flac", 10, 1_700_000_000_000_000_001), files[1]],
    ):
        assert listing.digest(changed) != d
    odd = os.fsdecode(b"caf\xe9.flac")  # Latin-1 bytes in a name: a surrogate escape in Python
    assert listing.digest([(odd, 1, 2)]) != listing.digest([("cafe.flac", 1, 2)])

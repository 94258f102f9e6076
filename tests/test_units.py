"""Token counts and memory sizes as users type them."""

import pytest

from gsae.units import parse_bytes, parse_count


def test_parse_count():
    assert parse_count("10M") == 10_000_000
    assert parse_count("500k") == 500_000
    assert parse_count("1B") == 1_000_000_000
    assert parse_count("2.5e6") == 2_500_000
    assert parse_count(42) == 42
    with pytest.raises(ValueError, match="not a count"):
        parse_count("lots")


def test_parse_bytes():
    assert parse_bytes("4G") == 4 << 30 and parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("1000") == 1000
    for bad in ("0", "-1G", "x"):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    with pytest.raises(ValueError, match="^--jaccard-memory must be > 0, got '0'$"):
        parse_bytes("0", "--jaccard-memory")
    with pytest.raises(ValueError, match="^--mmco-memory: not a memory size: 'lots'"):
        parse_bytes("lots", "--mmco-memory")

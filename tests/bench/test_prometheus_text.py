import pytest

from bench.prometheus_text import bucket_counts, format_buckets, histogram_buckets, share_at_most

SCRAPE = """# HELP promptserve_batch_rows Rows (image forwards) per micro-batch
# TYPE promptserve_batch_rows histogram
promptserve_batch_rows_bucket{le="1.0"} %d
promptserve_batch_rows_bucket{le="2.0"} %d
promptserve_batch_rows_bucket{le="4.0"} %d
promptserve_batch_rows_bucket{le="8.0"} %d
promptserve_batch_rows_bucket{le="+Inf"} %d
promptserve_batch_rows_count %d
promptserve_batch_rows_sum 0.0
# HELP promptserve_batch_queue_seconds Time a classify job waited for its batch
# TYPE promptserve_batch_queue_seconds histogram
promptserve_batch_queue_seconds_bucket{le="0.5"} 99.0
promptserve_batch_queue_seconds_bucket{le="+Inf"} 99.0
"""


def scrape(*cumulative: int) -> str:
    return SCRAPE % (*cumulative, cumulative[-1])


def test_histogram_buckets_reads_the_named_histogram_only():
    assert histogram_buckets(scrape(1, 3, 3, 7, 7), "promptserve_batch_rows") == {
        1.0: 1, 2.0: 3, 4.0: 3, 8.0: 7, float("inf"): 7}


def test_histogram_buckets_names_a_missing_histogram():
    with pytest.raises(ValueError, match="promptserve_missing"):
        histogram_buckets(scrape(0, 0, 0, 0, 0), "promptserve_missing")


def test_bucket_counts_are_the_batches_between_two_scrapes_per_bucket():
    before = histogram_buckets(scrape(2, 3, 3, 5, 5), "promptserve_batch_rows")
    after = histogram_buckets(scrape(3, 5, 9, 20, 20), "promptserve_batch_rows")
    counts = bucket_counts(before, after)
    assert counts == {1.0: 1, 2.0: 1, 4.0: 4, 8.0: 9, float("inf"): 0}
    assert share_at_most(counts, 2) == pytest.approx(2 / 15)
    assert format_buckets(counts) == "1:1 2:1 3-4:4 5-8:9"


def test_share_of_an_empty_histogram_is_zero():
    assert share_at_most({1.0: 0, float("inf"): 0}, 2) == 0.0

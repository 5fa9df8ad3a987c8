"""The CLI's log handler: lines are batched, but none is lost and problems show at once."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from minismtp.logs import BatchingHandler, Formatter, InfoLine


class WatchedStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.written = threading.Event()

    def write(self, text: str) -> int:
        count = super().write(text)
        self.written.set()
        return count


@contextmanager
def batched_logger(
    stream: io.StringIO, interval: float
) -> Iterator[tuple[logging.Logger, BatchingHandler]]:
    """A logger of its own writing to ``stream`` through a BatchingHandler, closed after."""
    handler = BatchingHandler(stream, interval=interval)
    handler.setFormatter(Formatter())
    logger = logging.getLogger(f"minismtp.test.{id(handler)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield logger, handler
    finally:
        handler.close()


def test_info_lines_wait_for_the_batch_and_come_out_in_order() -> None:
    stream = WatchedStream()
    with batched_logger(stream, interval=3600) as (logger, handler):
        for number in range(3):
            logger.info("transaction %d", number)
        assert stream.getvalue() == ""  # batched: not one write per line
        handler.flush()
        lines = stream.getvalue().splitlines()
        assert [line.split(": ", 1)[1] for line in lines] == [f"transaction {n}" for n in range(3)]
        assert all(" INFO minismtp.test." in line for line in lines)


def test_a_warning_is_written_at_once_with_the_lines_before_it() -> None:
    stream = WatchedStream()
    with batched_logger(stream, interval=3600) as (logger, _):
        logger.info("before")
        logger.warning("trouble")
        assert stream.getvalue().splitlines()[0].endswith("INFO " + logger.name + ": before")
        assert stream.getvalue().splitlines()[1].endswith("WARNING " + logger.name + ": trouble")


def test_lines_are_written_within_the_interval_without_further_logging() -> None:
    stream = WatchedStream()
    with batched_logger(stream, interval=0.05) as (logger, _):
        logger.info("quiet server")
        assert stream.written.wait(timeout=10), "the flusher thread never wrote the line"
        assert stream.getvalue().endswith(": quiet server\n")


def test_close_writes_what_is_left() -> None:
    stream = WatchedStream()
    with batched_logger(stream, interval=3600) as (logger, handler):
        logger.info("last words")
        handler.close()
        assert stream.getvalue().endswith(": last words\n")


@pytest.mark.parametrize(
    "created", [1_700_000_000.0, 1_700_000_000.042, 1_700_000_000.25, 1_700_000_001.999]
)
def test_the_date_matches_the_standard_formatter(created: float) -> None:
    record = logging.LogRecord("minismtp", logging.INFO, __file__, 1, "x", None, None)
    record.created = created
    record.msecs = (created - int(created)) * 1000
    standard = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    assert Formatter().format(record) == standard.format(record)


class Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def kept_logger(name: str, level: int) -> tuple[logging.Logger, Keep]:
    """A logger of its own whose records are kept, not written."""
    logger = logging.getLogger(f"minismtp.test.{name}")
    logger.propagate = False
    keep = Keep()
    logger.addHandler(keep)
    logger.setLevel(level)
    return logger, keep


def test_an_info_line_is_a_complete_record_like_logger_info_makes() -> None:
    logger, keep = kept_logger("info_line", logging.INFO)
    line = InfoLine(logger)
    before = time.time()
    line("first transaction")
    line("second transaction")
    logger.info("made by %s", "logger.info")
    first, second, usual = keep.records
    assert [first.getMessage(), second.getMessage()] == ["first transaction", "second transaction"]
    assert set(first.__dict__) == set(usual.__dict__)
    assert first.funcName == "test_an_info_line_is_a_complete_record_like_logger_info_makes"
    assert first.pathname == usual.pathname and first.process == usual.process
    assert first.levelno == logging.INFO and first.levelname == "INFO"
    assert before <= first.created <= second.created <= usual.created
    assert second.msecs == pytest.approx((second.created % 1) * 1000)


def test_an_info_line_below_the_level_makes_no_record() -> None:
    logger, keep = kept_logger("info_line_quiet", logging.WARNING)
    InfoLine(logger)("not wanted")
    assert keep.records == []


def test_an_info_line_to_the_batching_handler_alone_reads_as_logger_info_writes_it() -> None:
    stream = WatchedStream()
    with batched_logger(stream, interval=3600) as (logger, handler):
        InfoLine(logger)("transaction 1")
        logger.info("transaction %d", 2)
        handler.flush()
        direct, usual = stream.getvalue().splitlines()
        assert direct.split(" ", 2)[2] == f"INFO {logger.name}: transaction 1"
        assert usual.split(" ", 2)[2] == f"INFO {logger.name}: transaction 2"
        assert direct[:19] <= usual[:19]  # the date, to the second
        assert direct[19] == "," and direct[20:23].isdigit()


class Upper(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = str(record.msg).upper()
        return True


@pytest.mark.parametrize("where", ["logger", "handler"])
def test_an_info_line_passes_through_filters_and_second_handlers(where: str) -> None:
    stream = WatchedStream()
    with batched_logger(stream, interval=3600) as (logger, handler):
        keep = Keep()
        if where == "logger":
            logger.addFilter(Upper())
            logger.addHandler(keep)
        else:
            handler.addFilter(Upper())
        InfoLine(logger)("filtered")
        handler.flush()
        assert stream.getvalue().endswith(": FILTERED\n")
        if where == "logger":
            assert [record.getMessage() for record in keep.records] == ["FILTERED"]


def test_no_line_is_lost_while_the_flusher_writes_concurrently() -> None:
    stream = io.StringIO()
    with batched_logger(stream, interval=0.0005) as (logger, handler):  # flushing non-stop
        line = InfoLine(logger)

        def log_many(worker: int) -> None:
            for number in range(5000):
                line(f"worker {worker} line {number}")

        threads = [threading.Thread(target=log_many, args=(worker,)) for worker in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        handler.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 20000
    assert len(set(lines)) == 20000

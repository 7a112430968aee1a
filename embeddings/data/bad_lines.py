"""Counting malformed lines: skip them, log where they are, stop when a file is mostly broken."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

SAMPLES_KEPT = 5  # file:line samples kept per dataset for stats and error messages


class MalformedDataError(RuntimeError):
    """A dataset's share of malformed lines passed config.data.max_bad_line_share."""


class BadLineTracker:
    """Malformed-line counts of one dataset on this process, over its first pass.

    Each line is judged once (during the dataset's first epoch), so the counts
    describe the file rather than how often it was repeated.

    Args:
      location: the file or dataset, for messages.
      max_share: largest tolerated share of malformed lines.
      min_lines: lines judged before the share is enforced (unless the pass ends first), so
        that one bad line near the top of a file does not stop a run.
    """

    def __init__(self, location: str, max_share: float, min_lines: int):
        self.location = location
        self.max_share = max_share
        self.min_lines = min_lines
        self.checked = 0
        self.bad = 0
        self.samples: list[str] = []

    def add(self, checked: int, bad: list[str], pass_complete: bool) -> None:
        """Records a block of judged lines.

        Args:
          checked: lines judged in this block, good and bad.
          bad: one "file:line: reason" string per malformed line of the block.
          pass_complete: the block ends the dataset's first pass.

        Raises:
          MalformedDataError: the malformed share passed max_share.
        """
        self.checked += checked
        self.bad += len(bad)
        self.samples.extend(bad[: max(0, SAMPLES_KEPT - len(self.samples))])
        if bad:
            logger.warning(
                "%s: skipped %d malformed line(s) of %d (%d of %d so far), e.g. %s",
                self.location,
                len(bad),
                checked,
                self.bad,
                self.checked,
                "; ".join(bad[:3]),
            )
        enforce = pass_complete or self.checked >= self.min_lines
        if enforce and self.checked and self.bad / self.checked > self.max_share:
            raise MalformedDataError(
                f"{self.location}: {self.bad} of {self.checked} lines read are malformed "
                f"({self.bad / self.checked:.1%} > max_bad_line_share={self.max_share}), "
                f"e.g. {'; '.join(self.samples)}. Fix or drop the file, or raise "
                "config.data.max_bad_line_share."
            )
        if pass_complete and self.bad:
            logger.warning(
                "%s: first pass done, %d malformed line(s) of %d skipped.",
                self.location,
                self.bad,
                self.checked,
            )

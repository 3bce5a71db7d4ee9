"""Re-sending a request whose parties went away: the same for a continual stage and a federated GAN round."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from fedpsg.runs.folder import PartyError, PartyUnavailable

log = logging.getLogger("fedpsg.runs.retry")

Reply = TypeVar("Reply")


def send_with_retries(send: Callable[[], Reply], rediscover: Callable[[], None], retries: int, what: str) -> Reply:
    """``send()``; while it raises PartyUnavailable, ``rediscover()`` (a bounded wait for the parties
    to come back) and send again, at most ``retries`` times. ``what`` names the request in messages
    (``stage 2 (psg, partition 1)``, ``fed-gswgan round 3``); the errors ``send`` raises name it too.

    Raises PartyError once the retries are spent or a party does not come back: the run stops
    there, with everything finished so far on disk to resume from.
    """
    attempts = 0
    while True:
        attempts += 1
        try:
            return send()
        except PartyUnavailable as err:
            if attempts > retries:
                raise PartyError(f"{err}; gave up after {attempts} attempts") from err
            log.warning("%s; waiting for the parties to come back (retry %d of %d)", err, attempts, retries)
        try:
            rediscover()
        except PartyUnavailable as err:
            raise PartyError(f"{what}: the parties did not come back ({err})") from err
        log.info("the parties are back: retrying %s", what)

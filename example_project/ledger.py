"""A generated ledger of business customers and the audit that the demo job runs.

The ledger is one CSV file with a row per posted transaction, in posting order, for a
few customers at once. It is made by a seeded random generator, so every run of the
demo audits the same rows, and a few anomalies are planted on purpose: a transaction
posted twice under the same id, a payment that overdraws an account, and an entry
backdated behind the ones before it.

The audit is a pure function of the rows: the demo computes it in its own process and
compares it with what the job returned from a worker.
"""

from __future__ import annotations

import csv
import datetime
import logging
import os
import random
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Customers in the generated ledger, with the id prefix of their accounts.
CUSTOMERS: dict[str, str] = {
    'acme-bakery': 'ACC-1001',
    'birch-logistics': 'ACC-1002',
    'cobalt-dental': 'ACC-1003',
    'delta-farms': 'ACC-1004',
}

#: Columns of the ledger file, in order.
FIELDS = ('txn_id', 'date', 'customer', 'account', 'amount_cents', 'counterparty')

#: How many rows each customer gets, planted anomalies included.
ROWS_PER_CUSTOMER = 100_000

#: Seed of the generator: the same seed always writes the same file.
SEED = 20240117

_ACCOUNT_SUFFIXES = ('01', '02', '03')
_COUNTERPARTIES = (
    'Northwind Traders',
    'Harbor Freight Co',
    'City Water Utility',
    'Greenleaf Packaging',
    'Atlas Insurance',
    'Pioneer Payroll',
    'Summit Office Supply',
    'Riverbend Grain',
    'Metro Electric',
    'Bluebird Couriers',
    'Oakridge Rentals',
    'Customer card receipts',
    'Wholesale orders',
    'Online store payout',
)
_FIRST_DAY = datetime.date(2021, 1, 4)
_OPENING_CENTS = 2_500_000


@dataclass(frozen=True)
class LedgerRow:
    """One posted transaction.

    Attributes:
        txn_id: The bank's transaction id, meant to be unique.
        date: The posting date.
        customer: The customer that owns the account.
        account: The account id.
        amount_cents: Credit when positive, debit when negative.
        counterparty: Who paid or was paid.
    """

    txn_id: str
    date: datetime.date
    customer: str
    account: str
    amount_cents: int
    counterparty: str


@dataclass
class _Timeline:
    """The generator's running state for one customer."""

    customer: str
    rng: random.Random
    balances: dict[str, int]
    rows_left: int
    plants: dict[int, str]
    rows_written: int = 0
    recent: deque[LedgerRow] = field(default_factory=lambda: deque(maxlen=20))


def write_ledger(path: Path, rows_per_customer: int = ROWS_PER_CUSTOMER) -> int:
    """Write the generated ledger to a CSV file.

    The file is written under a temporary name and renamed into place, so a reader
    never sees half of it.

    Args:
        path: Where the CSV file goes; its folder is created if missing.
        rows_per_customer: Rows for each customer, planted anomalies included.

    Returns:
        The number of rows written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + '.partial')
    count = 0

    with partial.open('w', newline='') as out:
        writer = csv.writer(out)
        writer.writerow(FIELDS)
        for row in generate_rows(rows_per_customer):
            writer.writerow(
                (row.txn_id, row.date.isoformat(), row.customer, row.account,
                 row.amount_cents, row.counterparty)
            )
            count += 1

    os.replace(partial, path)
    logger.info('Wrote %d ledger rows to %s.', count, path)
    return count


def generate_rows(rows_per_customer: int = ROWS_PER_CUSTOMER) -> Iterator[LedgerRow]:
    """Generate the ledger's rows in posting order.

    Args:
        rows_per_customer: Rows for each customer, planted anomalies included.

    Yields:
        Rows for all customers, day by day, interleaved as a bank would post them.
    """
    rng = random.Random(SEED)
    timelines = [
        _new_timeline(customer, prefix, rows_per_customer, rng)
        for customer, prefix in CUSTOMERS.items()
    ]
    serial = 0
    day = _FIRST_DAY

    while any(t.rows_left for t in timelines):
        for timeline in timelines:
            for _ in range(min(timeline.rows_left, timeline.rng.randint(60, 120))):
                serial += 1
                # A multiplier prime to 10**9 spreads the ids without repeating one.
                row = _next_row(timeline, day, f'TX{serial * 7919 % 10**9:09d}')
                timeline.recent.append(row)
                yield row
        day += datetime.timedelta(days=1)


def _new_timeline(
    customer: str, prefix: str, rows: int, rng: random.Random
) -> _Timeline:
    """Open a customer's accounts and choose where its anomalies go."""
    own_rng = random.Random(rng.getrandbits(64))
    plants: dict[int, str] = {}

    # Not every customer gets every kind, and none lands in the first rows, where
    # there is nothing yet to duplicate or backdate behind.
    for kind, least, most in (('duplicate', 1, 3), ('overdraft', 0, 2),
                              ('backdated', 0, 2)):
        for _ in range(own_rng.randint(least, most)):
            plants[own_rng.randrange(1_000, rows - 1_000)] = kind

    accounts = {f'{prefix}-{suffix}': 0 for suffix in _ACCOUNT_SUFFIXES}
    return _Timeline(customer, own_rng, accounts, rows, plants)


def _next_row(timeline: _Timeline, day: datetime.date, txn_id: str) -> LedgerRow:
    """Make a customer's next row, which may be one of its planted anomalies."""
    rng = timeline.rng
    index = timeline.rows_written
    timeline.rows_written += 1
    timeline.rows_left -= 1
    accounts = sorted(timeline.balances)
    kind = timeline.plants.get(index)

    if index < len(accounts):
        account, amount = accounts[index], _OPENING_CENTS
        counterparty = 'Opening deposit'
    elif kind == 'duplicate':
        # A recent credit posted a second time; a credit, so that the copy cannot
        # overdraw the account as well.
        original = rng.choice([row for row in timeline.recent if row.amount_cents > 0])
        timeline.balances[original.account] += original.amount_cents
        return LedgerRow(original.txn_id, day, timeline.customer, original.account,
                         original.amount_cents, original.counterparty)
    elif kind == 'overdraft':
        account = rng.choice(accounts)
        amount = -(timeline.balances[account] + rng.randint(10_000, 900_000))
        counterparty = 'Equipment lease buyout'
    else:
        account = rng.choice(accounts)
        amount = _everyday_amount(rng, timeline.balances[account])
        counterparty = rng.choice(_COUNTERPARTIES)

    if kind == 'backdated':
        day -= datetime.timedelta(days=rng.randint(3, 40))
    timeline.balances[account] += amount
    return LedgerRow(txn_id, day, timeline.customer, account, amount, counterparty)


def _everyday_amount(rng: random.Random, balance: int) -> int:
    """Pick an ordinary amount that never overdraws the account by chance."""
    if balance < 0:
        # The bank covers an overdraft with a transfer that clears it.
        return -balance + rng.randint(100_000, 500_000)
    amount = int(rng.lognormvariate(9.5, 1.1))
    if rng.random() < 0.52 or amount > balance:
        return amount
    return -amount


def read_ledger(path: Path, customer: str | None = None) -> Iterator[LedgerRow]:
    """Read rows back from a ledger file.

    Args:
        path: The CSV file written by `write_ledger`.
        customer: Only this customer's rows, when given.

    Yields:
        The rows in file order.
    """
    with path.open(newline='') as source:
        reader = csv.reader(source)
        next(reader)
        for txn_id, date, owner, account, amount, counterparty in reader:
            if customer is None or owner == customer:
                yield LedgerRow(txn_id, datetime.date.fromisoformat(date), owner,
                                account, int(amount), counterparty)


class Audit:
    """An audit of one customer's history, fed rows in posting order.

    It finds three kinds of anomaly, each named by the id of the transaction where it
    shows: ``duplicate_txn_id`` when an id was already seen, ``negative_balance`` when
    an account goes below zero, and ``out_of_order_date`` when a row is dated before
    a row already posted.
    """

    def __init__(self, customer: str) -> None:
        """Start an empty audit.

        Args:
            customer: The customer whose rows are audited; other rows are skipped.
        """
        self.customer = customer
        self.rows = 0
        self.balances: dict[str, int] = {}
        self.anomalies: list[dict[str, Any]] = []
        self._seen: set[str] = set()
        self._latest: datetime.date | None = None

    def feed(self, rows: Iterable[LedgerRow]) -> None:
        """Take the next rows of the history into account.

        Args:
            rows: Rows in posting order; those of other customers are skipped.
        """
        for row in rows:
            if row.customer == self.customer:
                self._check(row)

    def _check(self, row: LedgerRow) -> None:
        """Check one row against everything seen before it."""
        self.rows += 1

        if row.txn_id in self._seen:
            self._flag('duplicate_txn_id', row)
        self._seen.add(row.txn_id)

        before = self.balances.get(row.account, 0)
        after = before + row.amount_cents
        self.balances[row.account] = after
        if before >= 0 > after:
            self._flag('negative_balance', row, balance_cents=after)

        if self._latest is not None and row.date < self._latest:
            self._flag('out_of_order_date', row, date=row.date.isoformat())
        else:
            self._latest = row.date

    def _flag(self, kind: str, row: LedgerRow, **detail: Any) -> None:
        """Record an anomaly found at this row."""
        found = {'kind': kind, 'txn_id': row.txn_id, 'account': row.account, **detail}
        self.anomalies.append(found)

    def state(self) -> dict[str, Any]:
        """Return the audit so far as a small JSON-serialisable checkpoint.

        The transaction ids already seen are left out: they are as many as the rows,
        and `resume` reads them back from the rows already audited.

        Returns:
            The row count, the balances, the anomalies and the latest date posted.
        """
        return {
            'rows': self.rows,
            'balances': dict(self.balances),
            'anomalies': [dict(found) for found in self.anomalies],
            'latest': None if self._latest is None else self._latest.isoformat(),
        }

    @classmethod
    def resume(cls, customer: str, state: dict[str, Any],
               audited: Iterable[LedgerRow]) -> Audit:
        """Rebuild an audit from a checkpoint that `state` returned.

        Args:
            customer: The customer whose rows are audited.
            state: The checkpoint.
            audited: The rows the checkpoint covers; only their ids are read, so no
                row is counted twice.

        Returns:
            An audit that goes on where the checkpoint left off.
        """
        audit = cls(customer)
        audit.rows = int(state['rows'])
        audit.balances = dict(state['balances'])
        audit.anomalies = [dict(found) for found in state['anomalies']]
        latest = state.get('latest')
        audit._latest = None if latest is None else datetime.date.fromisoformat(latest)
        audit._seen = {row.txn_id for row in audited if row.customer == customer}
        return audit

    def summary(self) -> dict[str, Any]:
        """Return what the audit found so far.

        Returns:
            A dict that survives a JSON round trip unchanged: the customer, the row
            count, the total and per-account balances in cents, and the anomalies in
            the order they were found.
        """
        return {
            'customer': self.customer,
            'rows': self.rows,
            'balance_cents': sum(self.balances.values()),
            'account_balances_cents': dict(sorted(self.balances.items())),
            'anomalies': [dict(found) for found in self.anomalies],
        }


def audit_history(rows: Iterable[LedgerRow], customer: str) -> dict[str, Any]:
    """Audit one customer's history in one pass.

    Args:
        rows: Ledger rows in posting order; other customers' rows are skipped.
        customer: The customer to audit.

    Returns:
        The summary described in `Audit.summary`.
    """
    audit = Audit(customer)
    audit.feed(rows)
    return audit.summary()

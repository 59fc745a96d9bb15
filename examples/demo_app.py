"""The ductwork demo app: five small pipelines that between them use every transition.

    EnrichUsers  start -> expand -> collapse          Step subclass writing self.context;
                                                      plain-function step using current_step()
    Orders       start -> divide (unpacked form) -> a.chain, b.expand/collapse -> a.combine(b)
                                                      a step that fails once, then succeeds
    TextStats    start -> divide -> combine           fluent form
    Triage       start -> divert (with otherwise) -> a branch chains -> converge;  on_halt
    Squares      start -> expand, left open           the run's output is the list

Everything is quick and deterministic: the same trigger arguments always give the same
output (``examples/demo.py`` checks them). Run it for real with

    python ductwork.py run -c examples/config/ductwork.yml
    python ductwork.py trigger EnrichUsers 3 -c examples/config/ductwork.yml
"""
from __future__ import annotations

import logging
import time

import ductwork

log = logging.getLogger("ductwork.demo")   # goes to ductwork's stdout log lines


# -- EnrichUsers: expand / collapse ------------------------------------------------------

class QueryUsers(ductwork.Step):
    def execute(self, count):                       # the trigger's arguments go to the first step
        return list(range(1, count + 1))            # one LoadUser step per element


class LoadUser(ductwork.Step):
    def execute(self, user_id):                     # one element of QueryUsers' output
        # The expanded steps run in parallel; finish the higher ids first so the demo shows
        # that collapse still gathers in element order, not in finishing order.
        time.sleep(0.001 * max(0, 5 - user_id))
        self.context.set("source", "crm")           # write-once; the same value again is fine
        self.context.set(f"user:{user_id}", f"user-{user_id}")
        return {"id": user_id, "name": f"user-{user_id}", "score": user_id * 10}


def report(users):                                  # a plain function is a step too
    step = ductwork.current_step()                  # what a Step sees as self.*
    return {
        "source": step.context.get("source"),
        "users": [u["name"] for u in users],         # element order of the expand
        "total_score": sum(u["score"] for u in users),
    }


class EnrichUsers(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(QueryUsers).expand(to=LoadUser).collapse(into=report)


# -- Orders: divide in the unpacked form, a chain and a nested expand on the branches ------

CATALOGUE = {"apple": 120, "bread": 250, "cheese": 675, "dates": 480}   # price in cents
STOCK = {"apple": 40, "bread": 0, "cheese": 7, "dates": 12}


def fetch_order(order_id):
    """A made-up order: a deterministic pick of catalogue items."""
    names = sorted(CATALOGUE)
    lines = [{"sku": names[(order_id + i) % len(names)], "qty": 1 + (order_id + i) % 3}
             for i in range(1 + order_id % 3)]
    return {"order_id": order_id, "lines": lines}


class Price(ductwork.Step):
    def execute(self, order):
        return sum(CATALOGUE[line["sku"]] * line["qty"] for line in order["lines"])


class Discount(ductwork.Step):
    """Fails its first attempt (a simulated timeout), succeeds on the retry."""

    def execute(self, subtotal):
        if self.attempt == 1:                        # 1 + failed attempts + crashes
            raise RuntimeError(f"pricing service timed out (simulated; idempotency key {self.idempotency_key})")
        return subtotal - subtotal // 10 if subtotal >= 1000 else subtotal


def stock_lines(order):
    return order["lines"]


def check_stock(line):
    return {"sku": line["sku"], "ok": STOCK[line["sku"]] >= line["qty"]}


def stock_report(checks):
    return {"in_stock": all(c["ok"] for c in checks), "missing": [c["sku"] for c in checks if not c["ok"]]}


def merge_order(branches):
    total, stock = branches                          # divide order: [price branch, stock branch]
    return {"total_cents": total, **stock, "status": "ready" if stock["in_stock"] else "backorder"}


class Orders(ductwork.Pipeline):
    @staticmethod
    def define(p):
        price, stock = p.start(fetch_order).divide(to=[Price, stock_lines])
        price.chain(to=Discount)                     # each branch continues on its own ...
        stock.expand(to=check_stock).collapse(into=stock_report)   # ... nested fan-outs too
        price.combine(stock, into=merge_order)


# -- TextStats: divide / combine, the fluent form -------------------------------------------

def normalize(text):
    return " ".join(text.lower().split())


def count_words(text):
    return len(text.split())


def count_vowels(text):
    return sum(text.count(v) for v in "aeiou")


def longest_word(text):
    return max(text.split(), key=len, default="")


def summarize(stats):                                # [count_words, count_vowels, longest_word]
    words, vowels, longest = stats
    return {"words": words, "vowels": vowels, "longest": longest}


class TextStats(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(normalize).divide(to=[count_words, count_vowels, longest_word]).combine(into=summarize)


# -- Triage: divert / converge with otherwise, and on_halt -----------------------------------

def classify(amount):
    if not isinstance(amount, (int, float)) or amount < 0:
        return "invalid"                             # no such key: the otherwise branch
    return "small" if amount < 100 else "large"


def auto_approve(label):
    return {"decision": "approved", "by": "auto"}


def manual_review(label):
    return {"decision": "review", "by": "queue"}


def assign_reviewer(review):                         # the large branch chains one more step
    return {**review, "by": "reviewer-1"}


def reject(label):
    return {"decision": "rejected", "by": "auto", "label": label}


def finish(decision):                                # the chosen branch's output, not a list
    return f"{decision['decision']} by {decision['by']}"


def alert_on_halt(run, reasons):
    """Called once per halted run, in the advancer, outside any transaction."""
    log.warning("demo: Triage run %s halted: %s", run.id, ", ".join(reasons))


class Triage(ductwork.Pipeline):
    @staticmethod
    def define(p):
        branches = p.start(classify).divert(to={
            "small": auto_approve,
            "large": manual_review,
            "otherwise": reject,                     # mandatory
        })
        branches["large"].chain(to=assign_reviewer)
        branches.converge(into=finish)
        p.on_halt(alert_on_halt)


# -- Squares: a fan-out left open at the end of the pipeline ---------------------------------

def numbers(n):
    return list(range(n))


def square(x):
    return x * x


class Squares(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(numbers).expand(to=square)            # no collapse: the run's output is the list


DEMO_PIPELINES = ["EnrichUsers", "Orders", "TextStats", "Triage", "Squares"]

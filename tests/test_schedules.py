"""Schedules (SPEC §16) and trigger keys (SPEC §17): each tick of a schedule is one run however many supervisors
(on one SQLite file, or on "hosts" sharing Postgres) fire it; after downtime only the latest missed tick fires;
a new schedule waits for its next tick; config switches one off; trigger(key=) gives one run per key. Real
supervisors and runtimes on real SQLite and PostgreSQL."""
from __future__ import annotations

import collections
import json
import signal
import threading
import time

import pytest
from conftest import run_cli
from procs import LOAD_SLACK, Proc, wait_until

import ductwork


def ping(x=None):
    return x


class SchedHourly(ductwork.Pipeline):
    schedule = [ductwork.Schedule(every=3600, args=[1]),
                ductwork.Schedule(cron="0 3 * * *", timezone="Europe/Berlin")]

    @staticmethod
    def define(p):
        p.start(ping)


class SchedKeyed(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(ping)


class SchedOther(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(ping)


def keyed_runs(engine, pipeline: str) -> list[tuple[int, str, str]]:
    with engine.store.tx(write=False) as t:
        return t.all("SELECT id, trigger_key, input FROM ductwork_runs WHERE pipeline = :p ORDER BY id",
                     {"p": pipeline})


def test_a_new_schedule_waits_for_its_next_tick_and_each_tick_fires_once(engine):
    hourly = SchedHourly.schedules[0]
    now = engine.store.now()
    tick = hourly.latest_at_or_before(now)
    assert engine.fire_schedule("SchedHourly", hourly, tick) is None   # first seen: its latest tick counts as done
    assert keyed_runs(engine, "SchedHourly") == []
    later = tick + 3600
    run_id = engine.fire_schedule("SchedHourly", hourly, later)
    assert run_id is not None
    assert engine.fire_schedule("SchedHourly", hourly, later) is None   # the same tick again: nothing
    assert engine.fire_schedule("SchedHourly", hourly, tick) is None    # an older one: nothing
    assert keyed_runs(engine, "SchedHourly") == [(run_id, f"schedule:{hourly.ident}:{later:.3f}", "[1]")]
    report = ductwork.schedule_report(engine, engine.config)
    mine = {r["ident"]: r for r in report if r["pipeline"] == "SchedHourly"}
    assert mine[hourly.ident]["last"] == later and mine[hourly.ident]["last_run"] == run_id
    assert mine[hourly.ident]["next"] == hourly.next_after(now) and mine[hourly.ident]["on"] is True
    assert mine[SchedHourly.schedules[1].ident]["last"] is None


def test_a_trigger_key_gives_one_run_per_pipeline_even_when_raced(engine):
    first = SchedKeyed.trigger(1, key="order-42")
    again = SchedKeyed.trigger(2, key="order-42")
    assert again.id == first.id and again.input == [1]
    assert (first.new, again.new, ductwork.Run.get(first.id).new) == (True, False, None)
    other = SchedOther.trigger(1, key="order-42")   # a key is per pipeline
    assert other.id != first.id
    got: list[int] = []
    barrier = threading.Barrier(6)

    def race():
        barrier.wait()
        got.append(SchedKeyed.trigger(3, key="raced").id)
    threads = [threading.Thread(target=race) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(got) == 6 and len(set(got)) == 1
    assert [k for _, k, _ in keyed_runs(engine, "SchedKeyed")] == ["order-42", "raced"]
    for bad in ("", 5, "x" * 501):
        with pytest.raises(ductwork.DuctworkError, match="a trigger key must be a non-empty string"):
            SchedKeyed.trigger(1, key=bad)


def test_a_bad_schedule_attribute_fails_the_pipeline_definition():
    with pytest.raises(ductwork.DefinitionError, match="schedule must be a ductwork.Schedule"):
        type("SchedBad", (ductwork.Pipeline,), {"schedule": "0 3 * * *",
                                                 "define": staticmethod(lambda p: p.start(ping))})
    with pytest.raises(ductwork.DefinitionError, match='cron "0 25 \\* \\* \\*": hour 25 is out of range 0-23'):
        ductwork.Schedule(cron="0 25 * * *")


APP_TEXT = '''
import ductwork


def tick(x):
    return x


class Every(ductwork.Pipeline):
    schedule = ductwork.Schedule(every=%(every)s, args=["tick"])

    @staticmethod
    def define(p):
        p.start(tick)
'''


def fired_ticks(engine) -> list[float]:
    return [float(key.rsplit(":", 1)[1]) for _, key, _ in keyed_runs(engine, "Every")]


@pytest.fixture
def every_app(tmp_path):
    def write(every: float) -> dict:
        (tmp_path / "every_app.py").write_text(APP_TEXT % {"every": every})
        return {"app": str(tmp_path / "every_app.py")}
    return write


def test_two_supervisors_fire_each_tick_once(tmp_path, procs, app_db, every_app):
    config = every_app(1)
    hosts = [Proc(tmp_path, app_db, name=f"host-{h}", machine=f"host-{h}", config=config) for h in "ab"]
    procs.extend(hosts)
    engine = ductwork._app_engine()
    wait_until(lambda: len(fired_ticks(engine)) >= 4, 4 + 2 * LOAD_SLACK, what="four ticks fired")
    for host in hosts:
        host.signal(signal.SIGTERM)
    for host in hosts:
        assert host.wait() == 0
    ticks = fired_ticks(engine)
    assert len(ticks) == len(set(ticks)), ticks                            # no tick twice
    assert ticks == sorted(ticks), ticks   # in order (a look delayed past a tick fires the latest: none twice)
    with engine.store.tx(write=False) as t:
        unfinished = [row[0] for row in t.all("SELECT id FROM ductwork_runs WHERE status != 'completed'")]
        newest = t.one("SELECT max(id) FROM ductwork_runs")[0]
    # every run completed, but the newest may be one fired as the stop came: a draining worker claims nothing new
    assert unfinished in ([], [newest]), (unfinished, newest)
    fired_by = collections.Counter(line.split()[0] for h in hosts for line in h.log().splitlines()
                                   if "schedule every 1s" in line and "fired run" in line)
    assert sum(fired_by.values()) == len(ticks)


def test_after_downtime_only_the_latest_missed_tick_fires(tmp_path, procs, every_app, app_db):
    url = app_db
    every = 1.0
    config = every_app(every)
    first = Proc(tmp_path, url, name="first", config=config)
    procs.append(first)
    engine = ductwork._app_engine()
    wait_until(lambda: fired_ticks(engine), every + 2 * LOAD_SLACK, what="a tick fired")
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    before = fired_ticks(engine)
    down = 4 * every
    time.sleep(down)   # the deployment is down for several ticks
    second = Proc(tmp_path, url, name="second", config=config)
    procs.append(second)
    wait_until(lambda: len(fired_ticks(engine)) > len(before), every + 2 * LOAD_SLACK, what="the catch-up tick")
    back_at = engine.store.now()
    caught_up = fired_ticks(engine)[len(before)]
    assert caught_up >= before[-1] + down - every, (before, caught_up)   # the latest missed one, not the next
    assert caught_up <= back_at
    second.signal(signal.SIGTERM)
    assert second.wait() == 0
    missed = [t for t in fired_ticks(engine) if before[-1] < t < caught_up]
    assert missed == []   # none of the ticks before it


def test_config_switches_a_schedule_off_and_the_cli_lists_them(tmp_path, every_app):
    url = f"sqlite:///{tmp_path}/ductwork.sqlite3"
    config = every_app(3600)
    env = {"DUCTWORK_DATABASE_URL": url, "DUCTWORK_APP": config["app"]}
    assert run_cli("migrate", env=env).returncode == 0
    listed = run_cli("schedules", env=env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("Every                        every 3600s with args [\"tick\"]  next ")
    assert listed.stdout.rstrip().endswith("never fired")
    cfg = tmp_path / "off.yml"
    cfg.write_text(f"database_url: {url}\napp: {config['app']}\nschedules: {{Every: false}}\n")
    off = run_cli("schedules", "--json", "-c", str(cfg))
    assert off.returncode == 0 and json.loads(off.stdout)[0]["on"] is False
    # in a process that defines it: the scheduler of an advancer fires it only while it is on
    SchedOther.schedules = [ductwork.Schedule(every=60)]
    try:
        on = ductwork.load_config(data={"database_url": url}, environ={})
        assert ductwork.Runtime(on, "combined", ["SchedOther"]).schedules() == [("SchedOther", SchedOther.schedules[0])]
        off_config = ductwork.load_config(data={"database_url": url, "schedules": {"SchedOther": False}}, environ={})
        runtime = ductwork.Runtime(off_config, "combined", ["SchedOther"])
        assert runtime.schedules() == [] and len(runtime.schedules(switched_off=True)) == 1
        # switched off, its ticks pass without a run; switched on again, it fires from its next tick only
        engine = runtime.engine
        every = SchedOther.schedules[0]
        tick = every.latest_at_or_before(engine.store.now())
        assert engine.fire_schedule("SchedOther", every, tick - 120, fire=False) is None   # first seen
        assert engine.fire_schedule("SchedOther", every, tick - 60, fire=False) is None    # off: passed
        assert engine.fire_schedule("SchedOther", every, tick - 60) is None                # on: not again
        assert engine.fire_schedule("SchedOther", every, tick) is not None                 # its next tick
        assert len(keyed_runs(engine, "SchedOther")) == 1
        runtime.store.close()
    finally:
        SchedOther.schedules = []
    typo = tmp_path / "typo.yml"
    typo.write_text(f"database_url: {url}\napp: {config['app']}\nschedules: {{Evrey: false}}\n")
    refused = run_cli("schedules", "-c", str(typo))
    assert refused.returncode == 2 and refused.stderr.strip() == (
        "ductwork: error: config key 'schedules' names pipeline 'Evrey', which is not defined (registered: Every)")
    bad = tmp_path / "bad.yml"
    bad.write_text("schedules: {Every: 0}\n")
    refused = run_cli("schedules", "-c", str(bad))
    assert refused.returncode == 2 and refused.stderr.strip() == (
        "ductwork: error: config key 'schedules' must map pipeline names to true or false, got {'Every': 0}")


RACER = '''
import sys, time
sys.path.insert(0, sys.argv[1])
import ductwork


def ping(x=None):
    return x


class KeyRace(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(ping)


ductwork.configure(database_url=sys.argv[2])
start = float(sys.argv[3])
while time.time() < start:   # every racer triggers at the same instant
    time.sleep(0.001)
run = KeyRace.trigger(1, key="webhook-7")
print(run.id, run.new)
'''


class KeyRace(ductwork.Pipeline):   # (the racers define it too, each in its own process)
    @staticmethod
    def define(p):
        p.start(ping)


def test_eight_processes_triggering_one_key_at_once_get_one_run_and_a_pruned_run_frees_it(tmp_path, engine,
                                                                                          start_runtime):
    import subprocess
    import sys

    from procs import ROOT
    ductwork.migrate()
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    url = engine.store.url
    at = time.time() + 3   # time enough for all eight to import and connect
    racers = [subprocess.Popen([sys.executable, str(script), str(ROOT), url, str(at)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(8)]
    answers = [racer.communicate(timeout=60) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers), [err for _, err in answers]
    said = sorted(out.split() for out, _ in answers)
    assert len({run_id for run_id, _ in said}) == 1, said
    assert [new for _, new in said].count("True") == 1, said   # one of them made it; seven were given it
    assert len(keyed_runs(engine, "KeyRace")) == 1
    start_runtime(["KeyRace"])
    assert ductwork.Run.get(int(said[0][0])).wait(timeout=LOAD_SLACK) == "completed"
    assert not KeyRace.trigger(2, key="webhook-7").new   # finished, still there: still its run
    assert engine.prune({"completed": 0})["KeyRace", "completed"] == 1   # pruned: the key is free again
    again = subprocess.run([sys.executable, str(script), str(ROOT), url, "0"], capture_output=True, text=True,
                           timeout=60)
    run_id, new = again.stdout.split()
    assert new == "True" and run_id != said[0][0], again.stderr


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)   # (SQLite: one writer at a time, its busy timeout)
def test_a_schedule_row_held_by_a_paused_process_delays_only_that_schedule(engine):
    hourly, daily = SchedHourly.schedules
    now = engine.store.now()
    first = {s.ident: s.latest_at_or_before(now) for s in (hourly, daily)}
    for schedule in (hourly, daily):
        assert engine.fire_schedule("SchedHourly", schedule, first[schedule.ident]) is None   # both seen
    held, release = threading.Event(), threading.Event()

    def paused_holder():   # a process that took the hourly row for its tick, then froze inside its transaction
        store = ductwork.Store(engine.store.url)
        with store.tx() as t:
            t.all("SELECT last_fire FROM ductwork_schedules WHERE ident = :i FOR UPDATE", {"i": hourly.ident})
            held.set()
            release.wait(30)
        store.close()
    holder = threading.Thread(target=paused_holder)
    holder.start()
    try:
        assert held.wait(10)
        started = time.monotonic()
        with pytest.raises(Exception, match="55P03"):   # gives up at the lock timeout instead of waiting
            engine.fire_schedule("SchedHourly", hourly, first[hourly.ident] + 3600)
        assert time.monotonic() - started < 2 + LOAD_SLACK
        assert engine.fire_schedule("SchedHourly", daily, first[daily.ident] + 86400) is not None   # the other fires
    finally:
        release.set()
        holder.join(30)
    assert engine.fire_schedule("SchedHourly", hourly, first[hourly.ident] + 3600) is not None   # and then this one

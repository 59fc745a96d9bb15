"""Schedules without a database (SPEC §16): the cron parser, fire times, time zones and DST days.

Fire times are checked against the calendar as datetime/zoneinfo compute it, and on DST days against a
brute-force oracle that walks every UTC minute of the day and applies the rule written in ductwork.py
(fixed-time schedules: once per local date and time, a skipped time at the end of the gap, a repeated one
at its first showing; wildcard schedules: every minute the clock shows, none that it skips)."""
from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import random
import subprocess
import sys
import zoneinfo

import pytest

import ductwork
from ductwork import DefinitionError, Schedule

UTC = dt.timezone.utc


def at(*parts: int, tz: dt.tzinfo = UTC, fold: int = 0) -> float:
    return dt.datetime(*parts, tzinfo=tz, fold=fold).timestamp()


def utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, UTC)


def fires(schedule: Schedule, start: float, end: float) -> list[float]:
    """Every fire time in (start, end], by next_after."""
    out, t = [], start
    while True:
        t = schedule.next_after(t)
        if t > end:
            return out
        out.append(t)


def fires_backwards(schedule: Schedule, start: float, end: float) -> list[float]:
    """Every fire time in (start, end], by latest_at_or_before, in time order."""
    out, t = [], schedule.latest_at_or_before(end)
    while t is not None and t > start:
        out.append(t)
        t = schedule.latest_at_or_before(t - 0.5)
    return out[::-1]


def transitions(zone: str, year: int) -> list[tuple[float, dt.timedelta, dt.timedelta]]:
    """(instant, offset before, offset after) of each change of the zone's UTC offset in ``year``, found with
    zoneinfo (hour by hour, then to the second): the DST days are computed, not trusted."""
    tz = zoneinfo.ZoneInfo(zone)

    def offset(t: float) -> dt.timedelta:
        return dt.datetime.fromtimestamp(t, tz).utcoffset()
    out = []
    t, end = at(year, 1, 1), at(year + 1, 1, 1)
    while t < end:
        if offset(t) != offset(t + 3600):
            low, high = int(t), int(t) + 3600
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if offset(middle) == offset(t) else (low, middle)
            out.append((float(high), offset(t), offset(t + 3600)))
        t += 3600
    return out


# -- the parser: every field form --------------------------------------------------------

@pytest.mark.parametrize("text, field, values", [
    ("* * * * *", "minutes", tuple(range(60))),
    ("5 * * * *", "minutes", (5,)),
    ("1,2,5 * * * *", "minutes", (1, 2, 5)),
    ("5,1,2,1 * * * *", "minutes", (1, 2, 5)),
    ("10-14 * * * *", "minutes", (10, 11, 12, 13, 14)),
    ("*/15 * * * *", "minutes", (0, 15, 30, 45)),
    ("1-30/5 * * * *", "minutes", (1, 6, 11, 16, 21, 26)),
    ("5/10 * * * *", "minutes", (5, 15, 25, 35, 45, 55)),
    ("0-4,50-59/3,*/20 * * * *", "minutes", (0, 1, 2, 3, 4, 20, 40, 50, 53, 56, 59)),
    ("*/59 * * * *", "minutes", (0, 59)),
    ("07 * * * *", "minutes", (7,)),
    ("0 * * * *", "hours", tuple(range(24))),
    ("0 */6 * * *", "hours", (0, 6, 12, 18)),
    ("0 9-17/4 * * *", "hours", (9, 13, 17)),
    ("0 23 * * *", "hours", (23,)),
    ("0 0 1,15,31 * *", "days", (1, 15, 31)),
    ("0 0 */10 * *", "days", (1, 11, 21, 31)),
    ("0 0 * 1-3 *", "months", (1, 2, 3)),
    ("0 0 * */4 *", "months", (1, 5, 9)),
    ("0 0 * JAN,jun,Dec *", "months", (1, 6, 12)),
    ("0 0 * mar-MAY *", "months", (3, 4, 5)),
    ("0 0 * FEB-DEC/5 *", "months", (2, 7, 12)),
    ("0 0 * * 0", "weekdays", (0,)),
    ("0 0 * * 7", "weekdays", (0,)),
    ("0 0 * * 0,7", "weekdays", (0,)),
    ("0 0 * * 1-5", "weekdays", (1, 2, 3, 4, 5)),
    ("0 0 * * MON-FRI", "weekdays", (1, 2, 3, 4, 5)),
    ("0 0 * * sun,Sat", "weekdays", (0, 6)),
    ("0 0 * * FRI-SUN", "weekdays", (0, 5, 6)),
    ("0 0 * * 5-7", "weekdays", (0, 5, 6)),
    ("0 0 * * 5-0", "weekdays", (0, 5, 6)),
    ("0 0 * * */2", "weekdays", (0, 2, 4, 6)),
    ("0 0 * * MON/2", "weekdays", (0, 1, 3, 5)),   # 1-7/2: the 7 is Sunday (as in Vixie cron)
    ("0 0 * * *", "weekdays", tuple(range(7))),
])
def test_field_forms(text, field, values):
    assert getattr(ductwork.parse_cron(text), field) == values


@pytest.mark.parametrize("alias, same_as", [
    ("@yearly", "0 0 1 1 *"), ("@annually", "0 0 1 1 *"), ("@monthly", "0 0 1 * *"), ("@weekly", "0 0 * * 0"),
    ("@daily", "0 0 * * *"), ("@midnight", "0 0 * * *"), ("@hourly", "0 * * * *"), ("@DAILY", "0 0 * * *"),
])
def test_aliases(alias, same_as):
    parsed, expanded = ductwork.parse_cron(alias), ductwork.parse_cron(same_as)
    assert dataclasses.replace(parsed, text=same_as) == expanded
    assert parsed.text == alias
    ticks = {}
    for cron in (alias, same_as):
        t, ticks[cron] = at(2026, 5, 17, 13, 7), []
        for _ in range(30):
            t = Schedule(cron=cron).next_after(t)
            ticks[cron].append(t)
    assert ticks[alias] == ticks[same_as]


def test_alias_fire_times():
    start = at(2026, 5, 17, 13, 7)
    assert utc(Schedule(cron="@yearly").next_after(start)) == dt.datetime(2027, 1, 1, tzinfo=UTC)
    assert utc(Schedule(cron="@monthly").next_after(start)) == dt.datetime(2026, 6, 1, tzinfo=UTC)
    assert utc(Schedule(cron="@weekly").next_after(start)) == dt.datetime(2026, 5, 24, tzinfo=UTC)   # a Sunday
    assert utc(Schedule(cron="@daily").next_after(start)) == dt.datetime(2026, 5, 18, tzinfo=UTC)
    assert utc(Schedule(cron="@hourly").next_after(start)) == dt.datetime(2026, 5, 17, 14, tzinfo=UTC)


def test_whitespace_is_collapsed():
    assert Schedule(cron="  0\t3  * * *  ").cron == "0 3 * * *"
    assert Schedule(cron="  0\t3  * * *  ") == Schedule(cron="0 3 * * *")


def test_weekday_matches_the_calendar():
    day = dt.date(1899, 12, 1)
    while day < dt.date(2101, 3, 1):
        assert ductwork._weekday(day.year, day.month, day.day) == day.isoweekday() % 7
        day += dt.timedelta(days=1)


# -- day-of-month and day-of-week: Vixie's either/both rule --------------------------------

def fire_dates(cron: str, start=(2026, 1, 1), end=(2027, 1, 1)) -> list[dt.date]:
    return [utc(t).date() for t in fires(Schedule(cron=cron), at(*start) - 1, at(*end) - 1)]


def test_both_restricted_either_matches():
    dates = fire_dates("0 0 13 * FRI")
    expected = [d for d in (dt.date(2026, 1, 1) + dt.timedelta(days=n) for n in range(365))
                if d.day == 13 or d.isoweekday() == 5]
    assert dates == expected
    assert dt.date(2026, 2, 13) in dates and dt.date(2026, 1, 13) in dates and dt.date(2026, 1, 2) in dates


def test_day_of_month_alone():
    assert fire_dates("0 0 13 * *") == [dt.date(2026, month, 13) for month in range(1, 13)]


def test_day_of_week_alone():
    dates = fire_dates("0 0 * * FRI")
    assert len(dates) == 52 and all(d.isoweekday() == 5 for d in dates)
    assert dates[0] == dt.date(2026, 1, 2)


def test_a_star_step_counts_as_star():
    # "*/2" starts with "*": day-of-month is not "restricted", so both fields must match (odd days AND Mondays)
    dates = fire_dates("0 0 */2 * MON")
    assert dates and all(d.day % 2 == 1 and d.isoweekday() == 1 for d in dates)
    expected = [d for d in (dt.date(2026, 1, 1) + dt.timedelta(days=n) for n in range(365))
                if d.day % 2 == 1 and d.isoweekday() == 1]
    assert dates == expected


def test_feb_29_on_a_weekday_is_found_decades_away():
    # Feb 29 that is a Sunday ("*/7" is day-of-week 0 and 7; starting with "*", both fields must match)
    schedule = Schedule(cron="0 12 29 2 */7")
    assert utc(schedule.next_after(at(2021, 1, 1))) == dt.datetime(2032, 2, 29, 12, tzinfo=UTC)
    assert utc(schedule.latest_at_or_before(at(2031, 1, 1))) == dt.datetime(2004, 2, 29, 12, tzinfo=UTC)
    leap = Schedule(cron="0 0 29 2 *")
    assert utc(leap.next_after(at(2096, 3, 1))) == dt.datetime(2104, 2, 29, tzinfo=UTC)   # 2100 is not leap
    assert utc(leap.latest_at_or_before(at(2104, 2, 28))) == dt.datetime(2096, 2, 29, tzinfo=UTC)


def test_month_ends():
    assert fire_dates("0 0 31 * *") == [dt.date(2026, m, 31) for m in (1, 3, 5, 7, 8, 10, 12)]
    assert fire_dates("0 0 30 * *")[1] == dt.date(2026, 3, 30)   # February has none
    assert fire_dates("59 23 28-31 * *")[:6] == [dt.date(2026, 1, d) for d in (28, 29, 30, 31)] + \
        [dt.date(2026, 2, 28), dt.date(2026, 3, 28)]


# -- invalid expressions ---------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("61 * * * *", 'cron "61 * * * *": minute 61 is out of range 0-59'),
    ("* 24 * * *", 'cron "* 24 * * *": hour 24 is out of range 0-23'),
    ("* * 0 * *", 'cron "* * 0 * *": day-of-month 0 is out of range 1-31'),
    ("* * 32 * *", 'cron "* * 32 * *": day-of-month 32 is out of range 1-31'),
    ("* * * 13 *", 'cron "* * * 13 *": month 13 is out of range 1-12'),
    ("* * * 0 *", 'cron "* * * 0 *": month 0 is out of range 1-12'),
    ("* * * * 8", 'cron "* * * * 8": day-of-week 8 is out of range 0-7'),
    ("* * *", 'cron "* * *": expected 5 fields (minute hour day-of-month month day-of-week), got 3'),
    ("", 'cron "": expected 5 fields (minute hour day-of-month month day-of-week), got 0'),
    ("* * * * * * *", 'cron "* * * * * * *": expected 5 fields (minute hour day-of-month month day-of-week), '
                      'got 7'),
    ("0 * * * * *", 'cron "0 * * * * *": expected 5 fields (minute hour day-of-month month day-of-week), got 6: '
                    'a seconds field is not supported'),
    ("x * * * *", "cron \"x * * * *\": minute 'x' is not a number"),
    ("MON * * * *", "cron \"MON * * * *\": minute 'MON' is not a number"),
    ("-5 * * * *", "cron \"-5 * * * *\": minute '-5' is not a number"),
    ("5- * * * *", "cron \"5- * * * *\": minute '5-' is not a number"),
    ("1.5 * * * *", "cron \"1.5 * * * *\": minute '1.5' is not a number"),
    ("\u0663 * * * *", "cron \"\u0663 * * * *\": minute '\u0663' is not a number"),
    ("* * * JANUARY *", "cron \"* * * JANUARY *\": month 'JANUARY' is not a number or a month name (JAN-DEC)"),
    ("* * * * FUNDAY", "cron \"* * * * FUNDAY\": day-of-week 'FUNDAY' is not a number or a day name (SUN-SAT)"),
    ("* * JAN * *", "cron \"* * JAN * *\": day-of-month 'JAN' is not a number"),
    ("* * * * L", "cron \"* * * * L\": day-of-week 'L' is not a number or a day name (SUN-SAT)"),
    ("* * ? * *", "cron \"* * ? * *\": day-of-month '?' is not a number"),
    ("*/0 * * * *", 'cron "*/0 * * * *": minute step 0 is out of range 1-59'),
    ("*/60 * * * *", 'cron "*/60 * * * *": minute step 60 is out of range 1-59'),
    ("0 */x * * *", "cron \"0 */x * * *\": hour step 'x' is not a number"),
    ("0 0 * * */MON", "cron \"0 0 * * */MON\": day-of-week step 'MON' is not a number"),
    ("0 0 * * 1/", "cron \"0 0 * * 1/\": day-of-week step '1/' is not a number"),
    ("0 22-2 * * *", 'cron "0 22-2 * * *": hour range 22-2 is backwards (write 22-23,0-2)'),
    ("0 0 * NOV-FEB *", 'cron "0 0 * NOV-FEB *": month range NOV-FEB is backwards (write 11-12,1-2)'),
    ("1,,2 * * * *", "cron \"1,,2 * * * *\": minute has an empty item in '1,,2'"),
    ("1, * * * *", "cron \"1, * * * *\": minute has an empty item in '1,'"),
    ("0 0 30 2 *", 'cron "0 0 30 2 *": never fires (day-of-month 30 never falls in month 2)'),
    ("0 0 31 4,6,9,11 *", 'cron "0 0 31 4,6,9,11 *": never fires (day-of-month 31 never falls in month 4,6,9,11)'),
    ("0 0 30-31 FEB */2", 'cron "0 0 30-31 FEB */2": never fires (day-of-month 30-31 never falls in month FEB)'),
    ("@reboot", 'cron "@reboot": @reboot is not supported (a schedule fires at times of day; for work at start-up '
                'use a hook such as ductwork.on_supervisor_start)'),
    ("@often", 'cron "@often": unknown alias @often '
               '(known: @yearly @annually @monthly @weekly @daily @midnight @hourly)'),
])
def test_invalid_expressions(text, message):
    with pytest.raises(DefinitionError) as info:
        Schedule(cron=text)
    assert str(info.value) == message


def test_impossible_dates_that_are_possible():
    # Both fields restricted: the weekday alone fires (Vixie's either rule), so Feb 30 with a weekday is fine
    schedule = Schedule(cron="0 0 30 2 MON")
    assert utc(schedule.next_after(at(2026, 2, 1))) == dt.datetime(2026, 2, 2, tzinfo=UTC)
    assert utc(Schedule(cron="0 0 29 2 *").next_after(at(2026, 1, 1))) == dt.datetime(2028, 2, 29, tzinfo=UTC)


def test_a_bad_schedule_fails_when_the_pipeline_class_is_defined():
    with pytest.raises(DefinitionError, match="minute 61 is out of range"):
        class CronBadPipeline(ductwork.Pipeline):   # never registered: its body raises
            schedule = Schedule(cron="61 * * * *")

            @staticmethod
            def define(p):  # pragma: no cover
                p.start(ductwork.Step)


# -- Schedule's other arguments ----------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({}, "Schedule needs exactly one of cron= and every=, got neither"),
    ({"cron": "* * * * *", "every": 60}, "Schedule needs exactly one of cron= and every=, got both"),
    ({"every": 0}, "Schedule(every=...) must be seconds from 1 to 31536000, got 0"),
    ({"every": -1}, "Schedule(every=...) must be seconds from 1 to 31536000, got -1"),
    ({"every": 0.5}, "Schedule(every=...) must be seconds from 1 to 31536000, got 0.5"),
    ({"every": True}, "Schedule(every=...) must be seconds from 1 to 31536000, got True"),
    ({"every": math.nan}, "Schedule(every=...) must be seconds from 1 to 31536000, got nan"),
    ({"every": math.inf}, "Schedule(every=...) must be seconds from 1 to 31536000, got inf"),
    ({"every": 365 * 86400 + 1}, "Schedule(every=...) must be seconds from 1 to 31536000, got 31536001"),
    ({"every": "60"}, "Schedule(every=...) must be seconds from 1 to 31536000, got '60'"),
    ({"every": 60, "timezone": "Europe/Berlin"},
     "Schedule(every=..., timezone='Europe/Berlin'): every ticks at multiples of its seconds since the Unix "
     "epoch; timezone applies to cron only"),
    ({"cron": 5}, "Schedule(cron=...) must be a string, got 5"),
    ({"cron": "* * * * *", "timezone": "Mars/Olympus_Mons"},
     "Schedule(timezone='Mars/Olympus_Mons'): unknown time zone (an IANA name such as 'Europe/Berlin', or 'UTC')"),
    ({"cron": "* * * * *", "timezone": "../../etc/passwd"},
     "Schedule(timezone='../../etc/passwd'): unknown time zone (an IANA name such as 'Europe/Berlin', or 'UTC')"),
    ({"cron": "* * * * *", "timezone": ""},
     "Schedule(timezone=''): unknown time zone (an IANA name such as 'Europe/Berlin', or 'UTC')"),
    ({"cron": "* * * * *", "timezone": None}, "Schedule(timezone=...) must be an IANA zone name, got None"),
    ({"every": 60, "args": "x"}, "Schedule(args=...) must be a tuple or list of JSON values, got 'x'"),
    ({"every": 60, "args": {"a": 1}}, "Schedule(args=...) must be a tuple or list of JSON values, got {'a': 1}"),
    ({"every": 60, "args": [object]}, "Schedule(args=...) must be JSON: Object of type type is not JSON "
                                      "serializable"),
    ({"every": 60, "args": [{1, 2}]}, "Schedule(args=...) must be JSON: Object of type set is not JSON "
                                      "serializable"),
    ({"every": 60, "args": [math.nan]}, "Schedule(args=...) must be JSON: Out of range float values are not "
                                        "JSON compliant"),
])
def test_invalid_arguments(kwargs, message):
    with pytest.raises(DefinitionError) as info:
        Schedule(**kwargs)
    assert str(info.value) == message


def test_args_are_stored_as_json_gives_them_back():
    schedule = Schedule(every=60, args=[1, (2, 3), {"k": None, 4: "x"}, "é"])
    assert schedule.args == (1, [2, 3], {"k": None, "4": "x"}, "é")
    assert isinstance(schedule.args, tuple)
    assert Schedule(every=60, args=(1, 2)) == Schedule(every=60, args=[1, 2])


def test_frozen():
    schedule = Schedule(every=60)
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.every = 5
    replaced = dataclasses.replace(schedule, every=120)
    assert replaced.every == 120.0 and replaced.next_after(0) == 120.0


def test_describe():
    assert str(Schedule(cron="0 3 * * *", timezone="Europe/Berlin")) == 'cron "0 3 * * *" (Europe/Berlin)'
    assert Schedule(cron="@daily").describe() == 'cron "@daily" (UTC)'
    assert str(Schedule(every=60)) == "every 60s"
    assert str(Schedule(every=60.0)) == "every 60s"
    assert str(Schedule(every=1.5)) == "every 1.5s"
    assert str(Schedule(every=60, args=[1, "a"])) == 'every 60s with args [1, "a"]'


# -- ident: stable names for the unique key of a tick -------------------------------------------

def test_ident_is_stable_and_distinct():
    a, b = Schedule(cron="0 3 * * *", args=[1]), Schedule(cron="0 3 * * *", args=[1])
    assert a.ident == b.ident and a == b and hash(a) == hash(b)
    assert len(a.ident) == 12 and int(a.ident, 16) >= 0
    others = [Schedule(cron="0 3 * * *", args=[2]), Schedule(cron="0 3 * * *"),
              Schedule(cron="0 3 * * *", args=[1], timezone="Europe/Berlin"), Schedule(cron="0 4 * * *", args=[1]),
              Schedule(every=60, args=[1]), Schedule(every=61, args=[1]), Schedule(cron="0 3 * * *", args=[True]),
              Schedule(cron="0 3 * * *", args=[1.0])]
    idents = {a.ident} | {s.ident for s in others}
    assert len(idents) == len(others) + 1
    assert all(s != a for s in others)
    assert Schedule(every=60).ident == Schedule(every=60.0).ident


def test_ident_is_the_same_in_another_python_run():
    code = ("import ductwork; print(ductwork.Schedule(cron='0 3 * * *', args=[1, 'x'], timezone='Europe/Berlin').ident,"
            " ductwork.Schedule(every=300).ident)")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}, cwd=ductwork.__file__.rsplit("/", 1)[0]).stdout
            for seed in ("1", "2")}
    here = f"{Schedule(cron='0 3 * * *', args=[1, 'x'], timezone='Europe/Berlin').ident} " \
           f"{Schedule(every=300).ident}\n"
    assert runs == {here}


def test_importing_ductwork_does_not_import_zoneinfo():
    code = "import sys, ductwork; print('zoneinfo' in sys.modules); ductwork.Schedule(every=60); " \
           "ductwork.Schedule(cron='* * * * *'); print('zoneinfo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=ductwork.__file__.rsplit("/", 1)[0])
    assert result.stdout.split() == ["False", "False"]   # UTC schedules need no tz database either


def test_schedule_is_public():
    assert "Schedule" in ductwork.__all__ and ductwork.Schedule is Schedule


# -- every: ticks at multiples since the epoch -----------------------------------------------------

def test_every_aligns_across_hosts():
    host_a, host_b = Schedule(every=300), Schedule(every=300)
    for t in (0, 1, 299.999, 300, 1_700_000_123.456, -1, -300):
        assert host_a.next_after(t) == host_b.next_after(t)
        assert host_a.latest_at_or_before(t) == host_b.latest_at_or_before(t)
    assert host_a.next_after(1000) == 1200.0
    assert host_a.next_after(1200) == 1500.0
    assert host_a.latest_at_or_before(1200) == 1200.0
    assert host_a.latest_at_or_before(1199.9) == 900.0
    assert host_a.latest_at_or_before(-1) == -300.0
    assert host_a.next_after(-1) == 0.0


def test_every_round_trips():
    rng = random.Random(7)
    for every in (1, 1.5, 7, 60, 3600, 86400, 2.2, 365 * 86400):
        schedule = Schedule(every=every)
        for _ in range(200):
            t = rng.uniform(0, 2e9)
            latest, upcoming = schedule.latest_at_or_before(t), schedule.next_after(t)
            assert latest <= t < upcoming
            assert schedule.next_after(latest) == upcoming and schedule.latest_at_or_before(upcoming) == upcoming
            assert upcoming - latest == pytest.approx(schedule.every, abs=4 * math.ulp(upcoming))
            assert (upcoming / schedule.every) == pytest.approx(round(upcoming / schedule.every), abs=1e-6)


# -- cron fire times ---------------------------------------------------------------------------------

def test_next_after_is_strict_and_latest_is_inclusive():
    schedule = Schedule(cron="*/15 * * * *")
    t = at(2026, 5, 17, 13, 15)
    assert schedule.next_after(t) == at(2026, 5, 17, 13, 30)
    assert schedule.next_after(t - 0.001) == t
    assert schedule.latest_at_or_before(t) == t
    assert schedule.latest_at_or_before(t - 0.001) == at(2026, 5, 17, 13, 0)
    assert schedule.latest_at_or_before(t + 59.5) == t


def test_fire_times_match_the_calendar():
    start, end = at(2026, 1, 1), at(2026, 1, 8)
    expected = [at(2026, 1, 1) + n * 3600 for n in range(1, 7 * 24 + 1)
                if utc(at(2026, 1, 1) + n * 3600).hour in (9, 10, 11, 12, 13, 14, 15, 16, 17)
                and utc(at(2026, 1, 1) + n * 3600).isoweekday() <= 5]
    assert fires(Schedule(cron="0 9-17 * * MON-FRI"), start, end) == expected
    assert fires_backwards(Schedule(cron="0 9-17 * * MON-FRI"), start, end) == expected


@pytest.mark.parametrize("cron, zone", [
    ("* * * * *", "UTC"), ("*/7 3-5 * * *", "Europe/Berlin"), ("30 2 * * *", "Europe/Berlin"),
    ("0 0 13 * FRI", "America/New_York"), ("15 1 * * 0", "America/New_York"), ("@monthly", "Asia/Kolkata"),
    ("0 12 29 2 *", "Australia/Lord_Howe"), ("45 23 31 12 *", "Pacific/Chatham"), ("0 */2 * * *", "Europe/Berlin"),
])
def test_round_trips(cron, zone):
    rng = random.Random(cron)
    schedule = Schedule(cron=cron, timezone=zone)
    points = [rng.uniform(at(2025, 1, 1), at(2030, 1, 1)) for _ in range(150)]
    points += [change + d for year in (2026, 2027) for change, _, _ in transitions(zone, year)
               for d in (-3601, -3600, -1800, -60, -1, 0, 0.5, 1, 60, 1800, 3599, 3600, 5400)]
    for t in points:
        latest, upcoming = schedule.latest_at_or_before(t), schedule.next_after(t)
        assert latest <= t < upcoming
        assert schedule.next_after(latest) == upcoming
        assert schedule.latest_at_or_before(upcoming) == upcoming
        assert schedule.latest_at_or_before(upcoming - 0.001) == latest
        assert upcoming == int(upcoming) and latest == int(latest)


def test_the_search_is_field_wise():
    # a yearly cron found far away costs steps per month, not per minute
    calls = []
    cron = ductwork.parse_cron("0 0 29 2 */7")
    original = ductwork.Cron.days_of

    def counting(self, year, month):
        calls.append((year, month))
        return original(self, year, month)
    ductwork.Cron.days_of = counting
    try:
        assert cron.next_wall((2021, 1, 1, 0, 0)) == (2032, 2, 29, 0, 0)
    finally:
        ductwork.Cron.days_of = original
    assert len(calls) == 12   # only each February from 2021 to 2032


# -- time zones and DST ---------------------------------------------------------------------------

def test_daily_in_berlin_winter_and_summer():
    schedule = Schedule(cron="0 3 * * *", timezone="Europe/Berlin")
    assert utc(schedule.next_after(at(2026, 1, 15))) == dt.datetime(2026, 1, 15, 2, tzinfo=UTC)
    assert utc(schedule.next_after(at(2026, 7, 15))) == dt.datetime(2026, 7, 15, 1, tzinfo=UTC)
    assert utc(schedule.latest_at_or_before(at(2026, 7, 15, 12))) == dt.datetime(2026, 7, 15, 1, tzinfo=UTC)
    kolkata = Schedule(cron="0 0 * * *", timezone="Asia/Kolkata")   # +05:30
    assert utc(kolkata.next_after(at(2026, 7, 15))) == dt.datetime(2026, 7, 15, 18, 30, tzinfo=UTC)


def dst_days(zone: str, year: int) -> tuple[dict, dict]:
    """The spring-forward and fall-back changes of ``zone`` in ``year`` (computed with zoneinfo)."""
    forward = [(t, b, a) for t, b, a in transitions(zone, year) if a > b]
    back = [(t, b, a) for t, b, a in transitions(zone, year) if a < b]
    assert len(forward) == len(back) == 1
    (t1, b1, a1), (t2, b2, a2) = forward[0], back[0]
    return ({"instant": t1, "before": b1, "after": a1, "local": utc(t1) + b1},
            {"instant": t2, "before": b2, "after": a2, "local": utc(t2) + b2})


def test_the_dst_days_are_the_ones_the_brief_names():
    berlin_forward, berlin_back = dst_days("Europe/Berlin", 2026)
    assert berlin_forward["local"].replace(tzinfo=None) == dt.datetime(2026, 3, 29, 2)   # 02:00 -> 03:00
    assert berlin_back["local"].replace(tzinfo=None) == dt.datetime(2026, 10, 25, 3)     # 03:00 -> 02:00
    ny_forward, ny_back = dst_days("America/New_York", 2026)
    assert ny_forward["local"].replace(tzinfo=None) == dt.datetime(2026, 3, 8, 2)        # 02:00 -> 03:00
    assert ny_back["local"].replace(tzinfo=None) == dt.datetime(2026, 11, 1, 2)          # 02:00 -> 01:00


def local_fires(schedule: Schedule, day: dt.date) -> list[str]:
    """The fire times on a local day, as local ISO strings with their offsets."""
    tz = zoneinfo.ZoneInfo(schedule.timezone)
    start = dt.datetime(day.year, day.month, day.day, tzinfo=tz).timestamp() - 3 * 3600
    local = [dt.datetime.fromtimestamp(t, tz) for t in fires(schedule, start, start + 30 * 3600)]
    return [x.isoformat(timespec="minutes") for x in local if x.date() == day]


def test_berlin_spring_forward():
    day = dst_days("Europe/Berlin", 2026)[0]["local"].date()
    daily = Schedule(cron="30 2 * * *", timezone="Europe/Berlin")
    assert local_fires(daily, day) == ["2026-03-29T03:00+02:00"]   # once, the moment the gap ends
    assert utc(daily.next_after(at(2026, 3, 28, 2))) == dt.datetime(2026, 3, 29, 1, tzinfo=UTC)
    assert utc(daily.latest_at_or_before(at(2026, 3, 29, 12))) == dt.datetime(2026, 3, 29, 1, tzinfo=UTC)
    assert utc(daily.next_after(at(2026, 3, 29, 1))) == dt.datetime(2026, 3, 30, 0, 30, tzinfo=UTC)
    hourly = Schedule(cron="30 * * * *", timezone="Europe/Berlin")   # wildcard: the skipped 02:30 does not fire
    assert [f for f in local_fires(hourly, day) if f.startswith("2026-03-29T0")][:4] == \
        ["2026-03-29T00:30+01:00", "2026-03-29T01:30+01:00", "2026-03-29T03:30+02:00", "2026-03-29T04:30+02:00"]
    several = Schedule(cron="0,30 2,3 * * *", timezone="Europe/Berlin")   # 02:00, 02:30 and 03:00: one instant
    assert [f for f in local_fires(several, day) if f.startswith("2026-03-29")] == \
        ["2026-03-29T03:00+02:00", "2026-03-29T03:30+02:00"]


def test_berlin_fall_back():
    day = dst_days("Europe/Berlin", 2026)[1]["local"].date()
    daily = Schedule(cron="30 2 * * *", timezone="Europe/Berlin")   # 02:00-03:00 is shown twice
    assert local_fires(daily, day) == ["2026-10-25T02:30+02:00"]   # the first 02:30 (CEST) only
    assert utc(daily.next_after(at(2026, 10, 24, 12))) == dt.datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    # from inside the second showing, neither search finds the second 02:30
    second = at(2026, 10, 25, 1, 45)
    assert utc(daily.next_after(second)) == dt.datetime(2026, 10, 26, 1, 30, tzinfo=UTC)
    assert utc(daily.latest_at_or_before(second)) == dt.datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    hourly = Schedule(cron="30 * * * *", timezone="Europe/Berlin")
    assert [f for f in local_fires(hourly, day) if f.startswith("2026-10-25T0")][:5] == \
        ["2026-10-25T00:30+02:00", "2026-10-25T01:30+02:00", "2026-10-25T02:30+02:00", "2026-10-25T02:30+01:00",
         "2026-10-25T03:30+01:00"]


def test_new_york_spring_forward():
    day = dst_days("America/New_York", 2026)[0]["local"].date()
    assert local_fires(Schedule(cron="30 2 * * *", timezone="America/New_York"), day) == ["2026-03-08T03:00-04:00"]
    assert local_fires(Schedule(cron="30 1 * * *", timezone="America/New_York"), day) == ["2026-03-08T01:30-05:00"]
    every_five = Schedule(cron="*/5 * * * *", timezone="America/New_York")
    times = [f for f in local_fires(every_five, day) if "T01:5" in f or "T03:0" in f or "T02" in f]
    assert times == ["2026-03-08T01:50-05:00", "2026-03-08T01:55-05:00", "2026-03-08T03:00-04:00",
                     "2026-03-08T03:05-04:00"]


def test_new_york_fall_back():
    day = dst_days("America/New_York", 2026)[1]["local"].date()   # 01:00-02:00 is shown twice
    daily = Schedule(cron="30 1 * * *", timezone="America/New_York")
    assert local_fires(daily, day) == ["2026-11-01T01:30-04:00"]
    assert utc(daily.next_after(at(2026, 10, 31, 12))) == dt.datetime(2026, 11, 1, 5, 30, tzinfo=UTC)
    hourly = Schedule(cron="30 * * * *", timezone="America/New_York")
    assert [f for f in local_fires(hourly, day) if f.startswith("2026-11-01T0")][:4] == \
        ["2026-11-01T00:30-04:00", "2026-11-01T01:30-04:00", "2026-11-01T01:30-05:00", "2026-11-01T02:30-05:00"]
    # from inside the first showing, the second showing of an earlier minute is still to come
    first = at(2026, 11, 1, 5, 40)   # 01:40 EDT
    assert utc(hourly.next_after(first)) == dt.datetime(2026, 11, 1, 6, 30, tzinfo=UTC)   # 01:30 EST
    assert utc(hourly.latest_at_or_before(first)) == dt.datetime(2026, 11, 1, 5, 30, tzinfo=UTC)
    every_ten = Schedule(cron="10,50 * * * *", timezone="America/New_York")
    assert utc(every_ten.next_after(at(2026, 11, 1, 5, 30))) == dt.datetime(2026, 11, 1, 5, 50, tzinfo=UTC)
    assert utc(every_ten.latest_at_or_before(at(2026, 11, 1, 6, 20))) == dt.datetime(2026, 11, 1, 6, 10, tzinfo=UTC)
    assert utc(every_ten.latest_at_or_before(at(2026, 11, 1, 6, 5))) == dt.datetime(2026, 11, 1, 5, 50, tzinfo=UTC)
    fixed_minutes = Schedule(cron="*/20 1 * * *", timezone="America/New_York")   # minute "*": a wildcard
    assert len([f for f in local_fires(fixed_minutes, day) if f.startswith("2026-11-01")]) == 6
    fixed_hour = Schedule(cron="0,20,40 1 * * *", timezone="America/New_York")   # fixed: the first showing only
    assert [f for f in local_fires(fixed_hour, day) if f.startswith("2026-11-01")] == \
        ["2026-11-01T01:00-04:00", "2026-11-01T01:20-04:00", "2026-11-01T01:40-04:00"]


def oracle(cron: str, zone: str, start: float, end: float) -> list[float]:
    """The fire times in (start, end] by brute force over UTC minutes, applying the documented DST rule."""
    parsed, tz = ductwork.parse_cron(cron), zoneinfo.ZoneInfo(zone)
    wildcard = cron.split()[0].startswith("*") or cron.split()[1].startswith("*")

    def matches(local: dt.datetime) -> bool:
        by_day = local.day in parsed.days
        by_weekday = local.isoweekday() % 7 in parsed.weekdays
        day = (by_day or by_weekday) if parsed.days_restricted and parsed.weekdays_restricted \
            else (by_day and by_weekday)
        return day and local.month in parsed.months and local.hour in parsed.hours and local.minute in parsed.minutes
    out = []
    t = math.floor(start / 60) * 60 + 60
    while t <= end:
        local = dt.datetime.fromtimestamp(t, tz)
        before = dt.datetime.fromtimestamp(t - 60, tz).replace(tzinfo=None)
        shown = matches(local) and (wildcard or local.fold == 0)
        skipped = []
        gap = local.replace(tzinfo=None) - before
        if gap > dt.timedelta(minutes=1) and not wildcard:   # the clock jumped: minutes it never showed
            skipped = [before + dt.timedelta(minutes=n) for n in range(1, gap // dt.timedelta(minutes=1))]
        if shown or any(matches(m) for m in skipped):
            out.append(float(t))
        t += 60
    return out


@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe"])
@pytest.mark.parametrize("cron", ["30 2 * * *", "30 1 * * *", "30 * * * *", "*/5 * * * *", "0 2-3 * * *",
                                  "*/20 1-2 * * *", "15,45 0-3 * * 0", "0 0 * * *", "59 1 * * *", "0 3 * * *",
                                  "*/30 2 * * *", "0,1,59 1-3 * * *"])
def test_dst_days_agree_with_the_oracle(cron, zone):
    schedule = Schedule(cron=cron, timezone=zone)
    for change, _, _ in transitions(zone, 2026):
        start, end = change - 6 * 3600, change + 6 * 3600
        expected = oracle(cron, zone, start, end)
        assert fires(schedule, start, end) == expected
        assert fires_backwards(schedule, start, end) == expected


# -- schedules_of ------------------------------------------------------------------------------------

def test_schedules_of():
    a, b = Schedule(cron="0 3 * * *"), Schedule(every=60)
    assert ductwork.schedules_of("P", None) == []
    assert ductwork.schedules_of("P", a) == [a]
    assert ductwork.schedules_of("P", [a, b]) == [a, b]
    assert ductwork.schedules_of("P", (b, a)) == [b, a]
    assert ductwork.schedules_of("P", []) == []
    assert ductwork.schedules_of("P", [a, Schedule(cron="0 3 * * *", args=[1])]) == \
        [a, Schedule(cron="0 3 * * *", args=[1])]


@pytest.mark.parametrize("value, message", [
    ("0 3 * * *", "pipeline P: schedule must be a ductwork.Schedule or a list of them, got '0 3 * * *'"),
    (60, "pipeline P: schedule must be a ductwork.Schedule or a list of them, got 60"),
    ({"cron": "* * * * *"},
     "pipeline P: schedule must be a ductwork.Schedule or a list of them, got {'cron': '* * * * *'}"),
    ([Schedule(every=60), None], "pipeline P: schedule must be a ductwork.Schedule or a list of them, got None"),
    ([Schedule(every=60), Schedule(every=60.0)], "pipeline P: schedule every 60s is listed twice"),
    ((Schedule(cron="0 3 * * *", args=[1]), Schedule(cron=" 0 3 * * * ", args=(1,))),
     'pipeline P: schedule cron "0 3 * * *" (UTC) with args [1] is listed twice'),
])
def test_schedules_of_rejects(value, message):
    with pytest.raises(DefinitionError) as info:
        ductwork.schedules_of("P", value)
    assert str(info.value) == message
